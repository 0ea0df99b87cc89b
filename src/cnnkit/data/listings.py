"""A source's listing on its way to the decoded images: remembered on disk between runs, and cut
down to fewer classes or fewer images per class."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from cnnkit.atomic import write_atomically
from cnnkit.data.source import Listing, SampleRecord, Source, encode_name

logger = logging.getLogger(__name__)


def list_samples_cached(source: Source, cache_dir: str | Path | None) -> Listing:
    """``source.list_samples()``, remembered on disk for sources that offer ``cache_token()``.

    Archive sources must decompress the whole archive to reach their label files (HASYv2's come
    last), so a second run reads the listing from ``cache_dir/listings`` instead.
    """
    token_of = getattr(source, "cache_token", None)
    token = token_of() if token_of else None
    if cache_dir is None or token is None:
        return source.list_samples()
    name = hashlib.sha256(encode_name(token)).hexdigest()[:24]
    path = Path(cache_dir) / "listings" / f"{name}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records = [
                SampleRecord(key, label, split, origin, tuple(box) if box else None)
                for key, label, split, origin, box in data["records"]
            ]
            return Listing(records, data["class_names"], data["fingerprint"], data["description"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable listing cache %s: %s", path, error)
    listing = source.list_samples()
    payload = {
        "records": [[r.key, r.label, r.split, r.origin, r.box] for r in listing.records],
        "class_names": listing.class_names,
        "fingerprint": listing.fingerprint,
        "description": listing.description,
    }
    # ASCII escapes keep a key that came from a non-UTF-8 file name (a surrogate) writable.
    text = json.dumps(payload)
    try:
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        logger.warning("could not write the listing cache %s: %s", path, error)
    return listing


def limit_listing(listing: Listing, max_classes: int | None, max_per_class: int | None) -> Listing:
    """Keep the first ``max_classes`` classes and at most ``max_per_class`` images of each."""
    if max_classes is None and max_per_class is None:
        return listing
    num_classes = len(listing.class_names)
    keep = set(range(min(max_classes or num_classes, num_classes)))
    counts: dict[tuple[int, str | None], int] = {}
    records: list[SampleRecord] = []
    for record in listing.records:
        if record.label not in keep:
            continue
        bucket = (record.label, record.split)
        counts[bucket] = counts.get(bucket, 0) + 1
        if max_per_class is not None and counts[bucket] > max_per_class:
            continue
        records.append(record)
    class_names = [listing.class_names[i] for i in sorted(keep)]
    return Listing(
        records,
        class_names,
        f"{listing.fingerprint}|classes={max_classes}|per_class={max_per_class}",
        f"{listing.description}, {len(records):,} images of {len(class_names):,} "
        f"{'class' if len(class_names) == 1 else 'classes'} kept",
    )
