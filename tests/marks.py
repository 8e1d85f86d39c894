"""Marks shared by the test modules."""

import os

import pytest

from fedvb.data import dataset_available

# Outside CI a dataset whose files cannot be found (data_dir, $FEDVB_DATA, shared/data beside the checkout,
# the Debian package) skips the tests that need it; in CI (CI=true) they run and fail, so a broken set-up
# cannot pass.
IN_CI = bool(os.environ.get("CI"))


def needs_data(*names: str) -> pytest.MarkDecorator:
    missing = [name for name in names if not dataset_available(name)]
    return pytest.mark.skipif(
        not IN_CI and bool(missing), reason=f"dataset files not found: {', '.join(missing)} (set FEDVB_DATA)"
    )
