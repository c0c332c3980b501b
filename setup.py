"""Installs the dependencies of the framework.

The source lives in ``codebase/`` and is deliberately *not* installed into site-packages
(its packages are called ``data``, ``models``, ``utils`` ...). Run it from ``codebase/`` or as
``python codebase/train.py`` from the repository root; pytest finds it via ``pythonpath``.
"""

from setuptools import setup

setup(
    name="codec-tts-trainer",
    version="0.1.0",
    description="A DLAS-style training framework for neural-codec text-to-speech",
    python_requires=">=3.10",
    packages=[],
    # codebase/ is not installed, so there is no package_data: Tortoise's vocabulary
    # (codebase/data/audio/tortoise_tokenizer.json) is read next to its module; MANIFEST.in
    # puts it in a source distribution.
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "numpy",
        "pyyaml>=6",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm",
        "soundfile",
        "h5py",
        "matplotlib",
        "phonemizer>=3.2",
        "espeakng-loader",
        "encodec",
        "vocos",
        "auraloss",
        "scipy",
        "dtw-python",  # DTW-aligned mel distance of the tts_samples evaluator
        # BPE text tokens for Tortoise's GPT (data/audio/bpe_tokenizer.py) and its cleaners
        "tokenizers>=0.15",
        "unidecode",
        "inflect>=7",
    ],
    extras_require={
        "wandb": ["wandb"],
        # DAC pulls librosa/numba and pins an old protobuf: opt in with `pip install -e ".[dac]"`
        "dac": ["descript-audio-codec"],
        # DeepSpeed >= 0.17 for its torch_autocast mode; `engine: deepspeed` in the YAML
        "deepspeed": ["deepspeed>=0.17"],
        "test": ["pytest>=8", "ruff==0.17.6", "wandb", "deepspeed>=0.17"],
    },
)
