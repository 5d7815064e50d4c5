"""Image-quality metrics: LPIPS (with its ImageNet VGG16, also usable as a loss network) and PSNR."""
