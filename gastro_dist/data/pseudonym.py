"""Pseudonyms for patient ids and source paths, so that a pack can leave the hospital.

Owns the key file (`pack --pseudonymise KEYFILE`, or the file named by $GASTRO_DIST_PSEUDONYM_KEY_FILE)
and the keyed hash (HMAC-SHA256) that replaces every patient id and every path before pack writes it.
The same key gives the same pseudonym, so packs made with one key can be merged and the splits still
keep each patient apart; without the key a pseudonym cannot be traced back, even by trying every
plausible medical record number. The key never leaves the user's machine: only its fingerprint is
recorded, which tells whether two packs used the same key and reveals nothing of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import posixpath
import stat
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from gastro_dist import UserError
from gastro_dist.files import open_regular_file

KEY_FILE_VARIABLE = "GASTRO_DIST_PSEUDONYM_KEY_FILE"
METHOD = "HMAC-SHA256, first 64 bits in hex"
PSEUDONYM_CHARS = 16  # 64 bits: distinct ids of even a national archive do not meet by chance
MIN_KEY_BYTES = 16  # 128 bits, the least that stops a search over every possible key
_MAX_KEY_FILE_BYTES = 4096
_MAKE_KEY = "python -c \"import secrets; print(secrets.token_hex(32))\" > KEYFILE"


class Pseudonymiser:
    """Turns patient ids and paths into what pack records: pseudonyms with a key, the originals without one.

    Patient ids and paths are hashed in separate domains, so a path never shares its pseudonym with an id.
    A path keeps its extension when it is in `kept_extensions` (a reader needs to know a video from a
    still); any other extension could be part of a name ('scan.Smith') and is hashed with the rest.
    """

    def __init__(self, key: bytes | None, kept_extensions: frozenset[str] = frozenset()):
        self._key = key
        self._kept_extensions = kept_extensions

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def key_fingerprint(self) -> str | None:
        return self._hash("key fingerprint", "") if self._key is not None else None

    def patient_id(self, patient_id: str | None) -> str | None:
        if self._key is None or patient_id is None:
            return patient_id
        return self._hash("patient", patient_id)

    def path(self, path: str) -> str:
        """'a/b/Doe.MP4' -> '<hash>.MP4'; a folder 'a/b/' -> '<hash>/'."""
        if self._key is None:
            return path
        name = path.rstrip("/")  # a folder has one pseudonym, written with or without its '/'
        folder_mark = "/" if name != path else ""
        extension = posixpath.splitext(name)[1]
        kept = extension if not folder_mark and extension.lower() in self._kept_extensions else ""
        return self._hash("path", name) + kept + folder_mark

    def _hash(self, domain: str, text: str) -> str:
        message = f"{domain}\0{text}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:PSEUDONYM_CHARS]


def load_pseudonymiser(key_file: str | Path | None, kept_extensions: frozenset[str],
                       out_dir: Path) -> Pseudonymiser:
    """The pseudonymiser for `key_file`, or for the file named by $GASTRO_DIST_PSEUDONYM_KEY_FILE (a site
    can set it once so that no pack forgets), or none; refuses keys that are too short or would travel
    with the shards (a key inside `out_dir`)."""
    key_file = key_file or os.environ.get(KEY_FILE_VARIABLE) or None
    if key_file is None:
        return Pseudonymiser(None, kept_extensions)
    path = Path(key_file)
    if Path(os.path.realpath(path)).is_relative_to(out_dir):
        raise UserError(f"the pseudonym key {path} is inside --out {out_dir}, so it would travel with the shards; "
                        "keep the key elsewhere")
    try:
        with open_regular_file(path) as handle:
            key = handle.read(_MAX_KEY_FILE_BYTES + 1).strip()
            mode = os.fstat(handle.fileno()).st_mode
    except OSError as err:
        raise UserError(f"cannot read the pseudonym key file {path} ({err.strerror or err}); make one with "
                        f"{_MAKE_KEY} and keep it private") from None
    if not MIN_KEY_BYTES <= len(key) <= _MAX_KEY_FILE_BYTES:
        raise UserError(f"the pseudonym key in {path} must hold {MIN_KEY_BYTES} to {_MAX_KEY_FILE_BYTES} bytes, "
                        f"it holds {len(key)}; make one with {_MAKE_KEY}")
    _warn_if_others_can_read(path, mode)
    return Pseudonymiser(key, kept_extensions)


def _warn_if_others_can_read(path: Path, mode: int) -> None:
    """Whoever can read the key can re-identify every patient of every pack made with it: warn, as ssh does
    for an "UNPROTECTED PRIVATE KEY FILE", when the group or others have any access to it (POSIX only)."""
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        Console(stderr=True, soft_wrap=True).print(
            f"[yellow]warning:[/] the pseudonym key file {escape(str(path))} is open to other users (mode "
            f"{stat.S_IMODE(mode):04o}): anyone who reads it can re-identify the patients; chmod 600 {escape(str(path))}")
