"""Tessera: a Label Studio ML backend with a VQ-VAE label model and a mask-conditional GAN."""
__version__ = "0.1.0"
