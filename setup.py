"""vlm_jax: train LLaVA-style vision-language models with JAX/Flax on TPUs."""
import setuptools

setuptools.setup(
    name="vlm_jax",
    version="0.1.0",
    description="JAX/Flax library for training LLaVA-style vision-language models on TPUs.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["vlm_jax", "vlm_jax.*"])
    + ["vlm_jax.datasets"] + ["vlm_jax.datasets." + p for p in setuptools.find_packages("data")],
    # The dataset builders live in the top-level `data/` folder but install as `vlm_jax.datasets`
    # so no top-level package named `data` lands in site-packages.
    package_dir={"vlm_jax.datasets": "data"},
    package_data={"vlm_jax.serve": ["page/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "tokenizers==0.23.3",
        "grain==0.2.18",
        "numpy>=2.0,<2.5",
        "pillow>=11,<14",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "etils[epath]>=1.7",
        "pyarrow>=17,<27",  # hf_parquet reads Hub parquet shards row group by row group
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        "torch": ["torch==2.13.0", "transformers==5.23.0", "safetensors==0.8.0", "peft==0.21.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        # `vlm-jax serve`; openai and selenium are the serve tests' clients (selenium drives Debian's chromium).
        "serve": ["starlette==1.10.0", "uvicorn==0.54.0", "openai==3.51.0", "selenium==4.51.0"],
    },
    entry_points={"console_scripts": ["vlm-jax=vlm_jax.cli:main"]},
)
