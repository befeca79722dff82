"""The one exception type users see: a message that says what is wrong and what to do."""


class FeatstoreError(Exception):
    """A problem with the user's input, model, corpus or store, explained in the message."""
