"""Stream the images of an ADM-style .npz (`arr_0`: uint8 (N, H, W, 3)) in batches, never all at once.

50,000 samples at 256² are 10 GB. np.load of an .npz reads a whole member into memory, so the member is
opened here by hand: memory-mapped where np.savez stored it uncompressed, decompressed as a stream where
np.savez_compressed deflated it.
"""
import struct
import zipfile

import numpy as np

from utils.errors import DataError
from utils.files import not_a_file

_LOCAL_HEADER_SIZE = 30  # fixed part of a zip local file header; name and extra field follow it


class NpzImages:
    """The uint8 (N, H, W, 3) image array `key` of the .npz at `path`, validated on opening."""

    def __init__(self, path, key="arr_0"):
        self.path = str(path)
        if not_a_file(self.path):
            raise DataError(f"{self.path}: {not_a_file(self.path)}")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [name.removesuffix(".npy") for name in archive.namelist()]
                if key not in names:
                    raise DataError(f"{self.path} has no '{key}' array (it holds {names}); "
                                     f"save images with np.savez(path, {key}=images)")
                self._member = archive.getinfo(f"{key}.npy")
                with archive.open(self._member) as stream:
                    self.shape, dtype = _read_npy_header(stream, self.path)
                    self._header_size = stream.tell()
        except zipfile.BadZipFile:
            raise DataError(f"{self.path} is not an .npz file (not a zip archive)") from None
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3 or 0 in self.shape[1:3]:
            raise DataError(f"{self.path}: '{key}' must be uint8 images of shape (N, H, W, 3), "
                             f"got {dtype} {self.shape}")
        if self.shape[0] < 2:
            raise DataError(f"{self.path}: needs at least 2 images for a covariance, got {self.shape[0]}")

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        """Yield uint8 arrays of up to `batch_size` images, in order."""
        if self._member.compress_type == zipfile.ZIP_STORED:
            images = np.memmap(self.path, np.uint8, "r", offset=self._data_offset(), shape=self.shape)
            for i in range(0, len(self), batch_size):
                yield np.array(images[i : i + batch_size])
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(self._member) as stream:
            stream.read(self._header_size)
            for i in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - i)
                data = bytearray(count * image_bytes)  # writable, so torch takes it without a copy
                if stream.readinto(data) != len(data):
                    raise DataError(f"{self.path}: array data ends after {i} of {len(self)} images")
                yield np.frombuffer(data, np.uint8).reshape(count, *self.shape[1:])

    def select(self, indices, batch_size):
        """Yield the images at `indices` (increasing), in batches of up to `batch_size`: read where they lie from a
        stored member, picked out of one pass over a deflated one."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._member.compress_type == zipfile.ZIP_STORED:
            images = np.memmap(self.path, np.uint8, "r", offset=self._data_offset(), shape=self.shape)
            for i in range(0, len(indices), batch_size):
                yield np.array(images[indices[i : i + batch_size]])
            return
        kept, start = [], 0
        for batch in self.batches(batch_size):
            rows = indices[(indices >= start) & (indices < start + len(batch))] - start
            kept.extend(batch[rows])
            start += len(batch)
            while len(kept) >= batch_size:
                yield np.stack(kept[:batch_size])
                kept = kept[batch_size:]
        if kept:
            yield np.stack(kept)

    def _data_offset(self):
        """Byte offset of the array data in the file: the central directory gives the local header's offset,
        whose own name and extra-field lengths (which may differ from the central directory's) follow."""
        with open(self.path, "rb") as f:
            f.seek(self._member.header_offset)
            header = f.read(_LOCAL_HEADER_SIZE)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return self._member.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length + self._header_size


def _read_npy_header(stream, path):
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise DataError(f"{path}: unsupported .npy format version {version}")
    if fortran_order:
        raise DataError(f"{path}: array is stored in Fortran order; save np.ascontiguousarray(images)")
    return shape, dtype
