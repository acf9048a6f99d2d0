"""mrnet_core: multiresolution sinusoidal networks (MR-Nets) for images, in pure torch.

One image's path: `images.read_image` -> `pyramid.gaussian_pyramid` -> `fit.fit` (stages of `network.MRNet`)
-> `encode.level_metrics` -> `modelfile.to_bytes`; `render.render` draws a model back at any size and level.
"""
__version__ = "0.1.0"
