"""The EMPIAR REST API: an entry's metadata, parsed defensively.

The API answers `{"EMPIAR-10076": {...}}` with loosely typed fields (`dataset_size` and image sizes as
strings, counts sometimes as numbers, sometimes as strings). We only need a few fields, and we say which
field was odd rather than failing deep inside the download.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from drgn_core.errors import DrgnError
from drgn_core.fetch.connections import LIMIT

DEFAULT_API_BASE = "https://www.ebi.ac.uk/empiar/api"
DEFAULT_DATA_BASE = "https://ftp.ebi.ac.uk/empiar/world_availability"


def normalize_accession(text: str) -> tuple[str, str]:
    """('EMPIAR-10076', '10076') from 'EMPIAR-10076', 'empiar10076' or '10076'."""
    m = re.fullmatch(r"(?i)(?:empiar[-_]?)?(\d{5,})", text.strip())
    if not m:
        raise DrgnError(f"{text!r} is not an EMPIAR accession (expected e.g. EMPIAR-10076 or 10076)")
    return f"EMPIAR-{m.group(1)}", m.group(1)


@dataclass
class ImageSet:
    """One `imagesets[]` item; counts are None where the API left them blank or unreadable."""

    name: str
    directory: str
    count: int | None
    pixel_size: float | None
    details: str = ""


@dataclass
class Entry:
    accession: str
    number: str
    title: str
    status: str
    dataset_size: str
    imagesets: list[ImageSet] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _loose_number(value, name: str, cast, warnings: list[str]):
    """A number given as a number, a numeric string, or blank; anything else is noted and dropped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return cast(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        warnings.append(f"field {name} = {value!r} is not a number; ignored")
        return None


def parse_entry(doc, accession: str, url: str) -> Entry:
    """Parse the API's JSON answer for `accession` (already normalised), naming the URL on errors."""
    acc, number = normalize_accession(accession)
    if not isinstance(doc, dict):
        raise DrgnError(f"{url}: the API answered {type(doc).__name__}, not a JSON object")
    body = doc.get(acc)
    if body is None:
        # Some mirrors key by the number alone, or answer the entry object directly.
        body = doc.get(number, doc if "title" in doc else None)
    if not isinstance(body, dict) or not body:
        raise DrgnError(f"{url}: unknown accession {acc} (the API has no entry of that name)")
    warnings: list[str] = []
    status = str(body.get("status", "") or "").strip().upper()
    if status and status != "REL":
        raise DrgnError(f"{url}: {acc} is not released (status {status!r}); its files are not public yet")
    sets = []
    raw_sets = body.get("imagesets") or []
    if not isinstance(raw_sets, list):
        warnings.append(f"field imagesets is {type(raw_sets).__name__}, not a list; ignored")
        raw_sets = []
    for i, s in enumerate(raw_sets):
        if not isinstance(s, dict):
            warnings.append(f"imagesets[{i}] is not an object; ignored")
            continue
        sets.append(ImageSet(
            name=str(s.get("name") or ""),
            directory=str(s.get("directory") or "").strip("/"),
            count=_loose_number(s.get("num_images_or_tilt_series"),
                                f"imagesets[{i}].num_images_or_tilt_series", int, warnings),
            pixel_size=_loose_number(s.get("pixel_width"), f"imagesets[{i}].pixel_width", float, warnings),
            details=str(s.get("details") or ""),
        ))
    return Entry(accession=acc, number=number, title=str(body.get("title") or ""), status=status or "REL",
                 dataset_size=str(body.get("dataset_size") or "").strip(), imagesets=sets, warnings=warnings)


def fetch_entry(accession: str, api_base: str = DEFAULT_API_BASE, timeout: float = 30.0) -> Entry:
    """GET {api_base}/entry/{EMPIAR-N}/ and parse it; 404 means an unknown (or unreleased) accession."""
    acc, _ = normalize_accession(accession)
    url = f"{api_base.rstrip('/')}/entry/{acc}/"
    try:
        with LIMIT.slot(), urllib.request.urlopen(url, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DrgnError(f"{url}: unknown or unreleased accession {acc} (HTTP 404)") from None
        raise DrgnError(f"{url}: the EMPIAR API answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DrgnError(f"{url}: cannot reach the EMPIAR API ({getattr(e, 'reason', e)})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DrgnError(f"{url}: the API's answer is not JSON ({e})") from None
    return parse_entry(doc, acc, url)
