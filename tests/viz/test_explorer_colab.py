"""On Colab the explorer turns on Colab's custom widget manager before it displays its panel."""

from __future__ import annotations

import sys
import types

from drasclr_lib.viz import explorer


def test_colab_custom_widget_manager_is_enabled_only_on_colab(monkeypatch):
    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("enabled"))
    colab = types.ModuleType("google.colab")
    colab.output = output
    google = types.ModuleType("google")
    google.colab = colab
    assert explorer.enable_colab_widgets() is False and calls == []  # JupyterLab, papermill
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    assert explorer.enable_colab_widgets() is True and calls == ["enabled"]


def test_show_explorer_enables_it_before_the_panel(monkeypatch):
    order = []
    monkeypatch.setattr(explorer, "enable_colab_widgets", lambda: order.append("manager"))
    fake = types.SimpleNamespace(widget=lambda: order.append("panel") or "PANEL")
    monkeypatch.setattr("IPython.display.display", lambda panel: order.append(f"display {panel}"))
    assert explorer.show_explorer(fake, interactive=True) == "PANEL"
    assert order == ["manager", "panel", "display PANEL"]
