"""Text-to-speech networks over codec tokens. Importing this package registers them: valle,
unified_voice2."""

from models.audio.tts import unified_voice2, valle  # noqa: F401 - registers the networks
