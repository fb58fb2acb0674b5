"""Models: the registry, our own architectures, timm and torchvision models, pretrained weights, conversion."""
