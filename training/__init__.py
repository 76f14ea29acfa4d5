"""Reference CLIP training loop built on fastclip_kernels (the library never imports this package)."""
