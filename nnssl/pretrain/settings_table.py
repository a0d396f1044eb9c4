"""``nnssl_pretrain --print-config``: the resolved settings of a run and where each value came from."""
from __future__ import annotations

import json

from nnssl.pretrain.config import DEFAULT, PretrainConfig


def settings_table(config: PretrainConfig, sources: dict[str, str]) -> str:
    """One line per loop setting and per method hyperparameter (``method.<name>``): name, value, source.

    ``sources`` comes from :func:`nnssl.pretrain.config.resolve_config_with_sources`. A run name left
    unset shows the name the run will get.
    """
    from nnssl.methods.registry import method_defaults
    from nnssl.pretrain.loop import default_run_name

    values = {k: v for k, v in config.to_dict().items() if k != "method_params"}
    if values["run"] is None:
        values["run"] = default_run_name(config) if config.datasets else "<backbone>_d<dataset ids>"
    params = {**method_defaults(config.method), **config.method_params}
    values.update({f"method.{k}": v for k, v in sorted(params.items())})
    rows = [(name, json.dumps(value), sources.get(name, DEFAULT)) for name, value in values.items()]
    name_width = max(len(r[0]) for r in rows)
    value_width = min(max(len(r[1]) for r in rows), 40)
    lines = [f"{'setting':<{name_width}}  {'value':<{value_width}}  from"]
    lines += [f"{name:<{name_width}}  {value:<{value_width}}  {source}" for name, value, source in rows]
    return "\n".join(lines)
