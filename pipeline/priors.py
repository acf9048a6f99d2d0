"""Finding the prior a model file was coded against: the one given (`--prior`), the job's OUT, or the default.

A job that encodes from a prior keeps a copy in OUT/priors/<prior id>.mrprior, so its rows decode wherever OUT
goes. A prior is named by its content's hash, and every candidate is checked against the id the model file
records: a missing or different prior is an error naming both ids, never a wrong image.
"""
import functools

from mrnet_core import modelfile
from mrnet_core import prior as priors

from . import store


def path_in(prior_id):
    return f"priors/{prior_id}.mrprior"


def keep(out, prior):
    """Copy `prior` into OUT (once; the name is its content's hash, so an existing copy is the same bytes)."""
    if not store.exists(out, path_in(prior.prior_id)):
        store.write_bytes(out, path_in(prior.prior_id), prior.data or priors.to_bytes(prior))


@functools.lru_cache(maxsize=16)
def _from_out(out, prior_id):
    """OUT's copy of prior `prior_id`, or None when OUT has none."""
    name = path_in(prior_id)
    size = store.file_size(out, name)
    if size is None:
        return None
    if size > priors.MAX_FILE_BYTES:  # checked before reading: a planted file could be any size
        raise priors.PriorError(f"{store.join(out, name)}: {size:,} bytes is more than any prior holds "
                                f"({priors.MAX_FILE_BYTES:,})")
    found = priors.from_bytes(store.read_bytes(out, name), store.join(out, name))
    if found.prior_id != prior_id:
        raise priors.PriorError(f"{store.join(out, name)}: holds prior {found.prior_id}, not {prior_id}")
    return found


def find(prior_id, out=None, given=None):
    """The prior `prior_id`: `given` (a Prior) if it is that one, else OUT's copy, else the package's default.

    PriorError naming the ids when none of them is it."""
    if given is not None:
        if given.prior_id != prior_id:
            raise priors.PriorError(f"the weights are coded against prior {prior_id}, not the given prior "
                                    f"{given.prior_id}")
        return given
    if out is not None:
        found = _from_out(out, prior_id)
        if found is not None:
            return found
    default = priors.default()
    if default is not None and default.prior_id == prior_id:
        return default
    where = f"it is not in {store.join(out, 'priors')}, and " if out is not None else ""
    shipped = f"the default prior is {default.prior_id}" if default is not None else "no default prior is installed"
    raise priors.PriorError(f"the weights are coded against prior {prior_id}; {where}{shipped}; give it with "
                            "--prior FILE")


def decode(data, name, out=None, given=None):
    """(model, meta) of model file bytes, with the prior it needs found by `find`; ModelFileError naming `name`."""
    needed = None  # for anything that is not a sound model file, from_bytes below says what is wrong, naming it
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            needed = modelfile.required_prior(data)
        except modelfile.ModelFileError:
            pass
    prior = None
    if needed is not None:
        try:
            prior = find(needed, out, given)
        except priors.PriorError as e:
            raise modelfile.ModelFileError(f"{name}: {e}") from None
    return modelfile.from_bytes(data, name, prior)
