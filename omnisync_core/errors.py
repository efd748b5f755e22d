"""Errors that carry one clear, user-facing sentence."""


class OmniSyncError(Exception):
    """Base class: the message is meant to be shown to the user as it is."""


class AudioError(OmniSyncError):
    """The audio input is missing, empty, silent where it must not be, or cannot be decoded."""


class InputError(OmniSyncError):
    """A user-supplied value (path, number, option) is unusable."""
