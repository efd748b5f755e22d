"""OmniSync core: pure PyTorch implementation of mask-free, audio-driven lip sync (arXiv 2505.21448).

Nothing in this package imports ComfyUI; the node pack in ``nodes/`` converts ComfyUI types to calls here.
"""

__version__ = "0.1.0"
