"""Text-to-speech networks over codec tokens. Importing this package registers them: valle."""

from models.audio.tts import valle  # noqa: F401 - registers the network
