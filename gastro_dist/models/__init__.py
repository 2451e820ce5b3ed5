"""Models: torchvision and timm backbones with a new classification head, their preprocessing and local
pretrained weights (backbones), which parameters train in each phase (freezing), and the optimizer's
parameter groups with layer-wise LR decay (param_groups)."""
