"""Puts the repository's sweeps/ folder on sublim's config search path as the group `sweeps`.

Sweep files live at the top level (sweeps/*.yaml) rather than inside conf/, and are selected with
`python -m sublim.train -m +sweeps=<name>`. Hydra discovers this plugin through the hydra_plugins
namespace package; it only touches search paths that contain sublim's own conf/.
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ROOT = Path(__file__).resolve().parents[2]


class SublimSweepsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf = ROOT / "conf"
        ours = any(Path(entry.path.removeprefix("file://")) == conf for entry in search_path.get_path())
        if ours and (ROOT / "sweeps").is_dir():
            search_path.append(provider="sublim-sweeps", path=f"file://{ROOT}")
