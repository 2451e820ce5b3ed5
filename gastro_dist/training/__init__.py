"""Training: the Accelerate trainer that runs head pre-training then fine-tuning, and its checkpoints."""
