"""Read an offline W&B run back from its ``run-*.wandb`` file (the records the real library wrote).

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log-style
32 KiB blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last), each
record a ``wandb_internal_pb2.Record`` protobuf.
"""

from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def run_records(run_dir: Path) -> list:
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return read_records(path)
