"""The extractor service: ImageNet-pretrained CNNs turn images into vectors at any layer."""
