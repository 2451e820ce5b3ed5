"""Models: torchvision backbones with a new classification head, local pretrained weights, freezing."""
