"""Imports every built-in component family so that their registries are filled."""

import data  # noqa: F401
import data.audio.hdf5_dataset  # noqa: F401
import data.audio.paired_dataset  # noqa: F401
import models  # noqa: F401
import models.audio.tts  # noqa: F401 - registers valle
import trainer.evaluators  # noqa: F401
import trainer.injectors  # noqa: F401
import trainer.losses  # noqa: F401
