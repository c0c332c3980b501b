"""Text-to-speech networks. Importing this package registers them: valle, unified_voice2,
lucidrains_dvae."""

from models.audio.tts import lucidrains_dvae, unified_voice2, valle  # noqa: F401 - registers the networks
