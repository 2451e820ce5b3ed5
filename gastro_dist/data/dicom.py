"""Reading DICOM objects (.dcm) as RGB pictures, with pydicom.

Owns what a DICOM must hold to be packed (pixel data in a transfer syntax an installed decoder reads:
uncompressed, RLE, deflated, JPEG baseline/extended and JPEG 2000 through Pillow; 8-bit RGB, YBR_FULL or
YBR_FULL_422 colour, or MONOCHROME1/2 up to 16 bits), the conversion to 8-bit RGB, the frame timing of
multi-frame objects (Frame Time, Frame Time Vector, Cine Rate or Recommended Display Frame Rate; without
any, every frame is a candidate), and the PatientID handed to pack for grouping. Frames are decoded one
at a time, only those sampled. What a file expands to is capped like its size (`--max-file-mb`) before it
is expanded: a deflated data set is inflated here with a limit (pydicom would inflate all of it), and a
frame's decoded size (Rows x Columns x samples x bytes) is checked from the header, and each JPEG frame's
own header against it before it is decoded. Every failure is a `BadImage` with one line. The header's own error
messages are left out of it, since they can quote header values (names, birth dates); pixel decoding
messages are kept. pydicom is the optional `dicom` extra: `require_pydicom` says how to add it.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np
from PIL import Image

from gastro_dist import UserError
from gastro_dist.data.frames import MAX_FRAMES_PER_S, Frame, FrameRules, TimeSampler
from gastro_dist.data.images import BadImage, jpeg_size

try:
    import pydicom
    from pydicom import pixels
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import generate_frames
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGTransferSyntaxes
except ImportError:  # the optional `dicom` extra; pack reports it once, before reading anything
    pydicom = None

DICOM_EXTENSIONS = frozenset({".dcm"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})  # YBR is converted to RGB by pydicom (as_rgb)
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})  # MONOCHROME1: 0 is white


def require_pydicom(num_files: int) -> None:
    if pydicom is None:
        raise UserError(f"{num_files} DICOM file(s) to pack, but pydicom is not installed; "
                        "install it with: pip install 'gastro-dist[dicom]'")


class DicomObject:
    """A parsed DICOM whose pixel data description has been checked (`read_dicom`)."""

    def __init__(self, dataset: Any, max_pixels: int, max_bytes: int):
        self._dataset = dataset
        syntax = self._syntax = dataset.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise BadImage("corrupt DICOM: no transfer syntax in the file meta information")
        if not _has_decoder(syntax):
            raise BadImage(f"unsupported transfer syntax: {syntax.name} ({syntax})")
        try:
            self.photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
            self.size = (int(dataset.Columns), int(dataset.Rows))
            self.num_frames = int(dataset.get("NumberOfFrames") or 1)
            self._bits_stored = int(dataset.get("BitsStored") or dataset.BitsAllocated)
            bits_allocated, signed = int(dataset.BitsAllocated), int(dataset.get("PixelRepresentation") or 0)
            samples_per_pixel = int(dataset.get("SamplesPerPixel") or 1)
            self.patient_id = str(dataset.get("PatientID") or "").strip() or None
            self._times_s = _frame_times_s(dataset, self.num_frames)
            pixel_data_bytes = len(dataset.PixelData)
        except (AttributeError, ValueError, TypeError, OverflowError) as err:
            raise BadImage(f"corrupt DICOM: unreadable image description ({type(err).__name__})") from None
        if self.photometric not in _COLOUR | _MONOCHROME:
            raise BadImage(f"unsupported photometric interpretation: {self.photometric or 'none'}")
        if self.photometric in _COLOUR and bits_allocated != 8:
            raise BadImage(f"unsupported pixel data: {bits_allocated}-bit colour")
        if signed or not 1 <= self._bits_stored <= 16:
            raise BadImage(f"unsupported pixel data: {'signed' if signed else f'{self._bits_stored}-bit'} samples")
        width_px, height_px = self.size
        if width_px < 1 or height_px < 1 or self.num_frames < 1:
            raise BadImage(f"corrupt DICOM: {width_px}x{height_px} pixels, {self.num_frames} frames")
        if width_px * height_px > max_pixels:
            raise BadImage(f"decompression bomb: {width_px}x{height_px} pixels exceeds the limit of {max_pixels}")
        # A frame is decoded whole: what it expands to is capped like the file, before anything is decoded.
        decoded_frame_bytes = width_px * height_px * samples_per_pixel * -(-bits_allocated // 8)
        if decoded_frame_bytes > max_bytes:
            raise BadImage(f"file too large: a frame of {width_px}x{height_px} pixels expands to {decoded_frame_bytes} "
                           f"bytes, the limit is {max_bytes}")
        # A declared frame count is checked against the bytes that are there: each compressed frame takes at
        # least one 8-byte item, each uncompressed one its full size.
        frame_bits = width_px * height_px * samples_per_pixel * bits_allocated
        frame_bytes = 8 if syntax.is_encapsulated else -(-frame_bits // 8)
        if self.num_frames * frame_bytes > pixel_data_bytes:
            raise BadImage(f"corrupt DICOM: {self.num_frames} frames of {width_px}x{height_px} declared, the pixel "
                           f"data holds {pixel_data_bytes} bytes")
        if self._times_s is not None and self.num_frames > 1:
            duration_s = self._times_s[-1] - self._times_s[0]
            if not duration_s > 0 or (self.num_frames - 1) / duration_s > MAX_FRAMES_PER_S:
                raise BadImage(f"corrupt DICOM: frame times give more than {MAX_FRAMES_PER_S} frames per second")

    def frames(self, rules: FrameRules) -> Iterator[Frame]:
        """The single picture of a one-frame object (a still), or the sampled frames of a multi-frame one."""
        if self.num_frames == 1:
            indices = [0]
        elif self._times_s is None:
            indices = range(self.num_frames)
            TimeSampler(rules).check_count(self.num_frames)
        else:
            sampler, indices = TimeSampler(rules), []
            for index, time_s in enumerate(self._times_s):
                if sampler.take(time_s):
                    indices.append(index)
                    sampler.check_count(len(indices))  # as soon as it is exceeded: frame counts are untrusted
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every odd header value, per file
                if self._syntax in JPEGTransferSyntaxes:
                    self._check_jpeg_sizes(indices)
                for index, array in zip(indices, pixels.iter_pixels(self._dataset, indices=indices, as_rgb=True)):
                    if self.num_frames == 1:
                        yield Frame(self._rgb(array), self.size, None, None)
                    else:
                        time_s = None if self._times_s is None else round(self._times_s[index], 3)
                        yield Frame(self._rgb(array), self.size, index, time_s)
        except BadImage:
            raise
        except Exception as err:  # numpy, Pillow and pydicom raise many types for damaged pixel data
            raise BadImage(f"corrupt DICOM pixel data: {type(err).__name__}: {err}") from None

    def _check_jpeg_sizes(self, indices: Sequence[int]) -> None:
        """Each JPEG frame to decode must be the size the header declares (and the pixel limit allows): the
        decoder allocates what the JPEG's own header says, so a larger one is refused before decoding."""
        wanted = set(indices)
        frames = generate_frames(self._dataset.PixelData, number_of_frames=self.num_frames)
        for index, frame in enumerate(frames):
            size = jpeg_size(frame) if index in wanted else None
            if size is not None and size != self.size:
                width_px, height_px = size
                raise BadImage(f"corrupt DICOM pixel data: frame {index} is a {width_px}x{height_px} JPEG, the header "
                               f"declares {self.size[0]}x{self.size[1]}")

    def _rgb(self, array: np.ndarray) -> Image.Image:
        if self.photometric in _COLOUR:
            return Image.fromarray(array.astype(np.uint8, copy=False), "RGB")
        scale = 255.0 / ((1 << self._bits_stored) - 1)
        grey = np.clip(np.round(array.astype(np.float32) * scale), 0, 255).astype(np.uint8)
        if self.photometric == "MONOCHROME1":
            grey = 255 - grey
        return Image.fromarray(grey, "L").convert("RGB")


def read_dicom(data: bytes, max_pixels: int, max_bytes: int) -> DicomObject:
    """Parse a DICOM file's bytes and check its pixel data description (nothing is decoded yet); `max_bytes`
    caps what the file expands to: its inflated data set (deflated transfer syntax) and each decoded frame."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = _parsed(data, max_bytes)
    except BadImage:
        raise
    except pydicom.errors.InvalidDicomError:
        raise BadImage("not a DICOM file: no DICM prefix after the 128-byte preamble") from None
    except Exception as err:  # the message may quote header values: the type only
        raise BadImage(f"corrupt DICOM: unreadable header ({type(err).__name__})") from None
    if "PixelData" not in dataset:
        raise BadImage("DICOM without pixel data")
    return DicomObject(dataset, max_pixels, max_bytes)


def _parsed(data: bytes, max_bytes: int) -> Any:
    """The data set, as `pydicom.dcmread` gives it; a deflated one is inflated here, at most `max_bytes` of it
    (pydicom inflates the whole data set in one call: a few MB can expand to gigabytes)."""
    stream = io.BytesIO(data)
    preamble = read_preamble(stream, force=False)
    file_meta = FileMetaDataset(read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                             stop_when=lambda tag, vr, length: tag.group != 2))
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data))
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(memoryview(data)[stream.tell():], max_bytes + 1)
    if len(inflated) > max_bytes:
        raise BadImage(f"file too large: its deflated data set inflates to more than {max_bytes} bytes, "
                       f"the limit is {max_bytes}")
    dataset = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(stream, dataset, preamble, file_meta, is_implicit_VR=False, is_little_endian=True)


def _has_decoder(syntax: Any) -> bool:
    try:
        return pixels.get_decoder(syntax).is_available
    except NotImplementedError:  # no decoder exists for this syntax at all
        return False


class _EvenTimes(Sequence):
    """Frame start times at a constant interval, computed when asked (the frame count is untrusted)."""

    def __init__(self, interval_s: float, num_frames: int):
        self._interval_s, self._num_frames = interval_s, num_frames

    def __len__(self) -> int:
        return self._num_frames

    def __getitem__(self, index: int) -> float:
        if not -self._num_frames <= index < self._num_frames:
            raise IndexError(index)
        return (index % self._num_frames) * self._interval_s


def _frame_times_s(dataset: Any, num_frames: int) -> Sequence[float] | None:
    """Start time of every frame in seconds, from the first timing attribute that makes sense."""
    frame_time_ms = _finite(dataset.get("FrameTime"))
    if frame_time_ms and frame_time_ms > 0:
        return _EvenTimes(frame_time_ms / 1000, num_frames)
    vector = dataset.get("FrameTimeVector")  # the first entry is 0, then each frame's increment
    is_list = isinstance(vector, Sequence) and not isinstance(vector, str)
    increments_ms = [_finite(ms) for ms in vector] if is_list else []
    if len(increments_ms) == num_frames and all(ms is not None and ms >= 0 for ms in increments_ms):
        return [float(total_ms) / 1000 for total_ms in np.cumsum(increments_ms)]
    for rate_attribute in ("CineRate", "RecommendedDisplayFrameRate"):
        frames_per_s = _finite(dataset.get(rate_attribute))
        if frames_per_s and frames_per_s > 0:
            return _EvenTimes(1 / frames_per_s, num_frames)
    return None


def _finite(value: Any) -> float | None:
    """A finite number, or None (absent, empty or garbage)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
