"""Exceptions raised by the library. The CLI turns each into one line and exit code 2."""


class TestTimeRegistersError(Exception):
    """Base class of every error this library raises on bad input."""

    __test__ = False  # not a pytest test class, despite the name


class InvalidArgumentError(TestTimeRegistersError, ValueError):
    """An argument is out of range for the model, e.g. a layer it does not have."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; :class:`InvalidArgumentError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int of at least {minimum}")
        raise InvalidArgumentError(f"{name} must be {kind}, got {value!r}")
    return value


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has a type the library cannot use, e.g. neurons that are not (layer, neuron) pairs."""


class ImageSourceError(TestTimeRegistersError, ValueError):
    """An image folder is missing or empty, or no readable image was found."""


class NeuronFileError(TestTimeRegistersError, ValueError):
    """A register-neuron file cannot be read or is not in the expected format."""


class IncompatibleNeuronsError(TestTimeRegistersError, ValueError):
    """Register neurons name a layer or neuron that the model does not have."""


class NoOutliersError(TestTimeRegistersError):
    """Discovery found no high-norm patch token in any image."""


class NonFiniteActivationsError(TestTimeRegistersError):
    """The model produced NaN or infinite values, typically from overflow in low precision."""


class ModelLoadError(TestTimeRegistersError):
    """A model spec is unknown, or its weights are missing, corrupt or unreachable."""


class UnsupportedModelError(TestTimeRegistersError, TypeError):
    """A hook manager was given a model it does not describe."""


class CheckpointError(TestTimeRegistersError, ValueError):
    """A checkpoint to resume from is missing, unreadable, or not a checkpoint of this kind and format."""


class NonFiniteLossError(TestTimeRegistersError, FloatingPointError):
    """Training's loss became NaN or infinite (as a rule, the learning rate is too high)."""


class MissingDependencyError(TestTimeRegistersError, ImportError):
    """A dependency that an install without dependencies may lack (matplotlib, for figures) is not installed."""


class RegisterLeakError(TestTimeRegistersError, RuntimeError):
    """Tokens the library added would reach what the model returns: the token count at the removal
    point is not the unmodified model's, or a method would read block outputs that carry them."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ActivationLogError(TestTimeRegistersError, ValueError):
    """An activation log cannot be read, or is not one this version writes."""


class TrainedRegistersError(ModelLoadError, ValueError):
    """A trained-register folder (registers.json + registers.safetensors) is missing, damaged, or its two files disagree."""


class ExportError(TestTimeRegistersError):
    """A model with test-time registers cannot be exported: an edit that does not trace, a forward that
    torch.export or the ONNX exporter cannot capture, a precision the format cannot reproduce, or an
    exported file that cannot be run."""


class ExportMismatchError(ExportError):
    """An exported file, run in a fresh process, does not give the model's outputs within the tolerance."""
