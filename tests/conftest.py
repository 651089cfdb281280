"""Test-wide setup: a sanitizer build of the C extensions when VDPA_SVQ_EXT_DIR asks for one."""

from tests import ext_dir

ext_dir.use()
