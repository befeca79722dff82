"""The exceptions users see: one base class, one subclass per kind of problem.

Every message says what is wrong and what to do; the type says which kind of problem it is,
so callers (the CLI, the service, a pipeline) can react to the kind without parsing text.
"""


class FeatstoreError(Exception):
    """A problem with the user's input, model, corpus or store, explained in the message."""

    def public_message(self) -> str:
        """The message for someone who must not see the inputs' content (a service's API client)."""
        return str(self)


class ConfigError(FeatstoreError):
    """An option or specification value is invalid or inconsistent."""


class CorpusError(FeatstoreError):
    """A corpus cannot be read or does not hold valid examples. `where` (file and line, or row) says where
    without quoting the corpus, since the message itself may."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where

    def public_message(self) -> str:
        return (f"the corpus was refused{f' at {self.where}' if self.where else ''}; the details may quote it, "
                "so they are only in the service's log of this job")


class ModelError(FeatstoreError):
    """An encoder cannot be loaded or used as asked."""


class StoreError(FeatstoreError):
    """A problem with a store (the base of the store-specific errors)."""


class StoreFormatError(StoreError):
    """Not a featstore store, or one whose metadata is malformed or of an unsupported version."""


class IncompleteStoreError(StoreError):
    """The store was never finalized (an extraction or copy is running or was interrupted)."""


class CorruptStoreError(StoreError):
    """The store's content does not match what it records (checksums, shapes, offsets)."""


class StoreConflictError(StoreError):
    """A path holds a different store or something else, and replacing it was not asked for."""


class LeaseHeldError(StoreError):
    """Another live process holds the store's write lease."""


class LeaseLostError(StoreError):
    """A writer's lease was taken over (it stalled past its expiry); it stopped before committing more."""


class IncompatibleHeadError(FeatstoreError):
    """A head is used with features it was not trained on (encoder, layers, task, labels)."""


class HeadFormatError(FeatstoreError):
    """A saved head is missing files, malformed, truncated or does not match its recorded weights digest."""


class TrainingError(FeatstoreError):
    """Training cannot go on (for example the loss stopped being a finite number)."""


class ServiceError(FeatstoreError):
    """The extraction service refused a request or cannot be reached."""
