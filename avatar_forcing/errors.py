"""Errors whose message is meant for the person running the program (printed as one line, no traceback)."""


class UserError(Exception):
    """Bad input or setup: the message says what was wrong and what to do."""


class MediaError(UserError):
    """A media file is missing, unreadable, empty, or holds no usable face / audio / frames."""


class WeightsError(UserError):
    """A checkpoint is missing, corrupted, or does not fit the model configuration."""


class NoFaceError(MediaError):
    """An image or video holds no face the detector can find."""
