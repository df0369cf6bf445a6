"""A spec file that does not validate still shows in the Dagster UI: as an asset that explains what is wrong."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of asset functions.

import re
from pathlib import Path

import dagster as dg

from pipelines.core.errors import SpecError

BROKEN_GROUP = "broken_specs"


def broken_spec_asset(error: SpecError) -> dg.AssetsDefinition:
    """`broken_specs/<file stem>`: its description lists the file's problems; materializing it fails with them."""
    stem = re.sub(r"[^a-z0-9_]+", "_", Path(error.path).stem.lower()).strip("_") or "spec"
    name = stem if stem[0].isalpha() else f"spec_{stem}"

    @dg.asset(name=name, key_prefix=[BROKEN_GROUP], group_name=BROKEN_GROUP, kinds={"yaml"},
              description=f"BROKEN SPEC — fix this file to get its pipeline back.\n\n```\n{error}\n```",
              metadata={"spec_file": dg.MetadataValue.path(error.path),
                        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in error.problems))})
    def broken_spec() -> None:
        raise error

    return broken_spec
