"""Bulk tokenization: a whole dataset to code shards, on any number of processes, resumable.

    python recipes/tokenize_dataset.py --input corpus/ --input-type folder --output codes/ --model descript/dac_44khz
    torchrun --nproc_per_node 8 recipes/tokenize_dataset.py --input 'shards/train-{000..999}.tar' \\
        --input-type webdataset --output codes/ --model descript/dac_44khz --device cuda --dtype bf16

    python recipes/tokenize_dataset.py --input corpus/ --input-type folder --output codes/ --engine ray

Inputs and the output may be fsspec URLs (``s3://bucket/codes``, ``gs://``, ``hf://``, with
``storage_options``): outputs go through :mod:`audiotok.utils.store`, which uploads each file whole.

The output is a code dataset (shards and a manifest, plus a ``.bulk/`` folder of job files
that readers ignore; it lets the job resume and must stay for "run again does nothing"); its format
is specified and implemented in :mod:`audiotok.formats.codedataset`. Every file operation on the output goes
through a :class:`~audiotok.utils.store.Store`, which guarantees atomic whole-file writes only (no
exclusive create, no compare-and-swap); the protocol below relies on nothing else.

Work split
==========

The plan. The input is cut into a fixed list of parts that depends only on the input (and
``part_records``), never on the number of processes or workers (:mod:`audiotok.bulk.inputs`): one
part per tar shard, ``part_records`` rows per part of a folder or saved dataset, one part per
shard of a streaming Hugging Face dataset. Every process computes the same plan, the part list
and a fingerprint of the job's settings, and writes it to ``.bulk/plan.json`` if it is not there;
a plan there with other settings is an error (resume with the same settings, or a new output).

Claims. A process claims parts dynamically: a part is free when it has no done marker
``.bulk/done/part-N.json`` and its claim ``.bulk/claims/part-N.json`` (``{"owner", "expires"}``)
is missing, expired, or names a process of this host that no longer runs. The process writes its
claim (owner ``host/pid/random``, expiry now + ``lease_seconds``), waits a moment (a tenth of the
lease, at most 1 s), re-reads it and works on the part if the claim still names it. While it works
it renews its claims every quarter lease; a claim found to name another owner is given up (the
part's unfinished shard is dropped). A process that fails releases its claims; a killed one's
lapse. Each process holds up to ``max(1, num_workers) + 1`` parts and hands them whole to its
DataLoader workers (a worker reads one part at a time), so the output does not depend on the
workers. A process ends when every part is done, waiting (and taking over lapsed claims) while
other processes finish theirs. The claim traffic (offers, re-reads, renewals, releases: round
trips to the store) runs in a thread of its own beside the encoding (:mod:`audiotok.bulk.parts`),
which offers claims on the next parts while earlier offers settle; the wait is counted from the
claims' writing.

At least once, same output. Without exclusive create two processes may both win a part (a claim
written during another's wait, a lease that lapsed under a live but stalled process). That costs
work, not correctness: a part's output is deterministic (its records in order; codes do not depend
on batching; shard names ``part-{part:06d}-{n:04d}`` and tar bytes fixed), so both write the same
files and nothing is duplicated.

Progress. After each shard is published (built at :meth:`Store.staging_path` and moved into place
with :meth:`Store.put_file`), ``.bulk/progress/part-N.json`` records the part's shards, failures
and the position they cover; a process that takes a part over continues there (no record is
encoded twice), and a shard published but not yet recorded is written again with the same name and
content. When a part ends, its done marker records its shards and failures and its claim is
deleted.

Manifest. When every part is done, the manifest is built from the done markers in part order
(the same whoever builds it) and written last, by every process that finds the job finished
(rank 0 only under torchrun, after a barrier; several writers are harmless). Then shards no part
records (only possible when a failure was not deterministic, e.g. an out-of-memory retry),
staging files and claims left by killed processes are removed.

Failure modes. A process that stalls longer than the lease (without renewing) loses its parts to
another process and leaves them when it notices; clocks of the machines must agree to well within
the lease. Only ``encode`` failures (out of memory) can make two runs of a part differ: should two
processes race on such a part, its done marker may not match its shard files. Processes on machines
with the same host name but separate process ids (containers sharing the host's name) may take a
live process's part for a dead one's: work done twice, same output. A process still redoing a part
when another writes the manifest may lose its staging file to the cleanup and fail; its work was
not needed.

Ray engine
==========

``engine="ray"`` (``--engine ray``, :mod:`audiotok.bulk.ray_engine`) runs the same job on a Ray
cluster (``ray_address``; by default the one ``RAY_ADDRESS`` or a local ``ray start`` names, else a
local instance started for the job). The driver plans the job (``.bulk/plan.json``, as above; the
model loaded on its CPU only for its identity), starts ``ray_actors`` encoding actors (one GPU
each with a CUDA ``device``, default one per GPU of the cluster; else one CPU each, default half
the cluster's CPUs), waits for them, and writes the manifest. Each actor loads the model on its
device and is one process of the protocol above, the torch engine's own code
(:func:`audiotok.bulk.parts.work`): it claims parts with the claim files (owner ``host/pid/random`` of
the actor's process), encodes them in length-sorted pools and writes shards, progress and done
markers with the same part writers. So the output (shards, ``.bulk/`` files, manifest but for its
``created`` time) is byte for byte the torch engine's, and a job begun by one engine is resumed or
finished by the other.

The only difference is reading: an actor's parts are read, decoded and resampled by Ray tasks (one
CPU each, anywhere in the cluster; ``num_workers`` of them per actor, at least one), each streaming
one part's bundles back to the actor, two ahead at most. Decoding is CPU work: as tasks it runs on
the CPUs of any node rather than in the GPU actor's process, and the actor's time goes to
encoding. Actors claim parts themselves rather than being handed them by the driver: one protocol
for both engines, so resuming, mixing engines and losing an actor need nothing new. The cluster
needs a CPU beyond its actors' for the read tasks (else an error), and every node must see the
input and ``output`` (a shared filesystem or an object store URL).

Resume and failures. Running the same command again continues from the done markers and progress
files, with any number of actors, as above. An actor that dies (its process killed, its node lost)
leaves its claims: they lapse after ``lease_seconds`` (at once for an actor on the dead one's host,
which sees its process gone), and the other actors take its parts over, continuing each from its
progress file; an actor whose work raises releases its claims. The job fails only when every actor
has stopped with parts left (a ``RuntimeError`` from the first actor's error; the work done stays
for the next run). A driver that is interrupted kills its actors; their claims lapse.

Sidecar layout
==============

``layout="sidecar"`` (WebDataset input and format) writes one code shard per input shard,
``train-000123.tar`` -> ``train-000123.codes.tar``, with the input's sample keys (``__key__``) in
input order: a zipped read of the two shards pairs every sample. A sample that failed has a member
``{key}.failure.txt`` (``reason: detail``) instead of codes, and is listed in the manifest's
failures; shard-level errors (an unreadable rest of a tar) have no key and are only listed.

    import webdataset as wds
    for audio, codes in zip(wds.WebDataset("train-000123.tar"), wds.WebDataset("codes/train-000123.codes.tar")):
        assert audio["__key__"] == codes["__key__"]   # codes["codes.npy"], or codes["failure.txt"]

A sidecar part has one shard, so a part interrupted mid-way is read again from its start.
Unreadable, empty, NaN, too-short records are skipped and listed in the manifest in either layout.
"""

from ..formats.codedataset import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PARQUET_METADATA_KEY,
    RECORD_FIELDS,
    ParquetShardWriter,
    TarShardWriter,
    dataset_metadata,
    parquet_schema,
    record_key,
    safe_name,
)
from .claims import STATE_DIR
from .encode import encode_items
from .inputs import Decoded, Failure, InputSpec, PartReader, part_stream, prepare
from .job import DTYPES, ENGINES, FORMATS, LAYOUTS, BulkConfig, BulkSummary, default_workers
from .runner import tokenize_dataset

__all__ = [
    "DTYPES",
    "ENGINES",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUTS",
    "PARQUET_METADATA_KEY",
    "RECORD_FIELDS",
    "STATE_DIR",
    "BulkConfig",
    "BulkSummary",
    "Decoded",
    "Failure",
    "InputSpec",
    "ParquetShardWriter",
    "PartReader",
    "TarShardWriter",
    "dataset_metadata",
    "default_workers",
    "encode_items",
    "parquet_schema",
    "part_stream",
    "prepare",
    "record_key",
    "safe_name",
    "tokenize_dataset",
]
