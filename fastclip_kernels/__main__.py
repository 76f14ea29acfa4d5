"""``python -m fastclip_kernels``: versions, device, and which backends and peers are usable."""

from .env import main

if __name__ == "__main__":
    main()
