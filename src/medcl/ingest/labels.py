"""Where a video's label and patient id come from: metadata tables and file-name patterns.

Resolution order for each file (first non-empty value wins):

* label:   ``--metadata`` row's label column -> the ``--patient-metadata`` row of the file's
  patient -> ``--label-pattern`` matched against the file's path relative to SRC -> "" (unlabeled);
* patient: ``--metadata`` row's patient column -> ``--patient-pattern`` -> the DICOM PatientID
  (for DICOM files; explicit user sources win over the tag) -> the video id.

With ``--hash-patient-ids SALT`` every patient id that came from a table, pattern or DICOM tag
(and the DICOM StudyInstanceUID) is stored as :func:`hash_id` of it instead; labels are still
looked up with the raw id. The per-file fallback (the video id) is stored as it is: the manifest
names the file anyway.

A metadata row is matched to a file by, in order: its path relative to SRC, its path relative to
the metadata file's folder, its file name, its file name without extension (COVID-BLUES'
``severity.csv`` lists ``patient_62_R1`` for ``lus_videos/patient_62_R1.mp4``). A name that two
rows share is never used for matching. Labels are never parsed from fixed character positions:
patterns are regular expressions with a named group (``label`` / ``patient``) or one group.
``label_map`` renames raw labels (``{"0": "negative", "1": "covid"}``); unmapped labels pass
through unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class LabelSourceError(ValueError):
    """Bad label configuration: names the file, column or pattern and what was expected."""


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise LabelSourceError(f"{path}: metadata file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as exc:
        raise LabelSourceError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from None
    except (OSError, csv.Error) as exc:
        raise LabelSourceError(f"{path}: cannot read it as CSV: {exc}") from None


def _require_column(path: Path, header: list[str], column: str, flag: str) -> None:
    if column not in header:
        raise LabelSourceError(f"{path}: no column {column!r} (set by {flag}); columns are {header}")


def _compile(pattern: str | None, group: str, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise LabelSourceError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None
    if group not in compiled.groupindex and compiled.groups != 1:
        raise LabelSourceError(
            f"{flag} {pattern!r} needs a named group (?P<{group}>...) or exactly one group; it has {compiled.groups}"
        )
    return compiled


def _match(pattern: re.Pattern[str] | None, group: str, text: str) -> str:
    if pattern is None:
        return ""
    found = pattern.search(text)
    if not found:
        return ""
    value = found.group(group) if group in pattern.groupindex else found.group(1)
    return (value or "").strip()


HASH_HEX_DIGITS = 16  # 64 bits: a collision among a million patients has odds of about 3e-8


def hash_id(value: str, salt: str) -> str:
    """A salted one-way id: HMAC-SHA256 of ``value`` keyed with ``salt``, first 16 hex digits.

    The same value and salt always give the same id (so one patient keeps one id across runs and
    files); without the salt, the raw id cannot be recovered or confirmed by hashing guesses.
    """
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:HASH_HEX_DIGITS]


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"0=negative,1=covid"`` -> ``{"0": "negative", "1": "covid"}``."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise LabelSourceError(f"--label-map item {item!r} is not RAW=NAME (example: 0=negative,1=covid)")
        raw, name = item.split("=", 1)
        mapping[raw.strip()] = name.strip()
    return mapping


@dataclass
class LabelSource:
    """Looks up ``(label, patient_id)`` for a file (see module doc)."""

    src_root: Path
    metadata: Path | None = None
    file_column: str = "file"
    label_column: str | None = "label"
    patient_column: str | None = "patient_id"
    label_pattern: str | None = None
    patient_pattern: str | None = None
    patient_metadata: Path | None = None
    patient_key_column: str = "patient_id"
    patient_label_column: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.src_root = Path(os.path.abspath(self.src_root))  # abspath, not resolve: keep symlinks
        self._label_re = _compile(self.label_pattern, "label", "--label-pattern")
        self._patient_re = _compile(self.patient_pattern, "patient", "--patient-pattern")
        self._rows: dict[str, dict[str, str]] = {}
        self._by_name: dict[str, dict[str, str] | None] = {}
        self._by_stem: dict[str, dict[str, str] | None] = {}
        self._meta_root: Path | None = None
        self.matched_rows: set[int] = set()
        self.n_rows = 0
        if self.metadata is not None:
            self.metadata = Path(self.metadata)
            header, rows = _read_table(self.metadata)
            _require_column(self.metadata, header, self.file_column, "--file-column")
            # default column names are optional, explicitly chosen ones must exist
            if self.label_column and self.label_column not in header:
                if self.label_column != "label":
                    _require_column(self.metadata, header, self.label_column, "--label-column")
                self.label_column = None
            if self.patient_column and self.patient_column not in header:
                if self.patient_column != "patient_id":
                    _require_column(self.metadata, header, self.patient_column, "--patient-column")
                self.patient_column = None
            self._meta_root = Path(os.path.abspath(self.metadata)).parent
            self.n_rows = len(rows)
            for index, row in enumerate(rows):
                row["__row__"] = str(index)
                key = row[self.file_column].replace("\\", "/")
                while key.startswith("./"):
                    key = key[2:]
                if not key:
                    continue
                self._rows[key] = row
                name = key.rsplit("/", 1)[-1]
                stem = name.rsplit(".", 1)[0] if "." in name else name
                self._by_name[name] = None if name in self._by_name else row
                self._by_stem[stem] = None if stem in self._by_stem else row
        self._patient_labels: dict[str, str] = {}
        if self.patient_metadata is not None:
            self.patient_metadata = Path(self.patient_metadata)
            if not self.patient_label_column:
                raise LabelSourceError("--patient-metadata needs --patient-label-column (the column holding the label)")
            header, rows = _read_table(self.patient_metadata)
            _require_column(self.patient_metadata, header, self.patient_key_column, "--patient-key-column")
            _require_column(self.patient_metadata, header, self.patient_label_column, "--patient-label-column")
            self._patient_labels = {
                r[self.patient_key_column]: r[self.patient_label_column] for r in rows if r[self.patient_key_column]
            }

    def _row_for(self, path: Path) -> dict[str, str] | None:
        path = Path(os.path.abspath(path))
        candidates = []
        try:
            candidates.append(path.relative_to(self.src_root).as_posix())
        except ValueError:
            pass
        if self._meta_root is not None:
            candidates.append(Path(os.path.relpath(path, self._meta_root)).as_posix())
        for key in candidates:
            if key in self._rows:
                return self._rows[key]
        return self._by_name.get(path.name) or self._by_stem.get(path.stem)

    def lookup(self, path: str | Path, tag_patient: str = "") -> tuple[str, str, bool]:
        """``(label, patient_id, found_in_metadata)`` for a file; empty strings when unknown.
        ``tag_patient``: the patient the file itself names (DICOM PatientID), used when neither
        the metadata nor the pattern gives one."""
        path = Path(os.path.abspath(path))
        try:
            relative = path.relative_to(self.src_root).as_posix()
        except ValueError:
            relative = path.name
        row = self._row_for(path) if self.metadata is not None else None
        if row is not None:
            self.matched_rows.add(int(row["__row__"]))
        label = (row.get(self.label_column, "") if row and self.label_column else "") or ""
        patient = (row.get(self.patient_column, "") if row and self.patient_column else "") or ""
        if not patient:
            patient = _match(self._patient_re, "patient", relative)
        if not patient:
            patient = tag_patient
        if not label and patient and self._patient_labels:
            label = self._patient_labels.get(patient, "")
        if not label:
            label = _match(self._label_re, "label", relative)
        label = self.label_map.get(label, label)
        return label, patient, row is not None

    @property
    def n_unmatched_rows(self) -> int:
        return self.n_rows - len(self.matched_rows)
