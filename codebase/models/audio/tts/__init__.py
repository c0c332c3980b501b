"""Text-to-speech networks. Importing this package registers them: valle, lucidrains_dvae."""

from models.audio.tts import lucidrains_dvae, valle  # noqa: F401 - registers the networks
