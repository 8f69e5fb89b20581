"""Packaging for catalog-semantic-ids (distribution name) -- packages `rqvae` and `pipelines`."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="catalog-semantic-ids",
    version="0.1.0",
    description="Spark batch pipeline: catalog item embeddings -> hierarchical Semantic IDs (RQ-VAE)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rqvae", "rqvae.*", "pipelines", "pipelines.*", "jobs", "jobs.*"]),
    # The core library needs only torch + numpy; everything Spark/MLflow is an extra so that
    # `pip install catalog-semantic-ids` on a GPU training node stays small.
    install_requires=["torch>=2.1", "numpy>=1.26"],
    extras_require={
        "spark": [
            "pyspark[connect]>=4.0.1,<=4.2.0",  # delta-spark 4.4 and pysail 0.7 both support these
            "pysail>=0.7,<0.8",
            "delta-spark>=4.0,<4.5",
            "deltalake>=1.0",
            "mlflow>=3.0,<4",
            "pandas>=2.2,<3",
            "pyarrow>=18",
            "tqdm>=4.60",
            "xxhash>=3.0",
        ],
        "dev": ["pytest>=8", "ruff>=0.6", "mypy>=1.10"],
    },
    entry_points={"console_scripts": ["tokenize-catalog=jobs.tokenize_catalog:main"]},
)
