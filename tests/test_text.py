from morph.text import markup_safe, printable


def test_printable_escapes_controls_and_bidi_keeps_text():
    assert printable("layer1.0.conv1") == "layer1.0.conv1"
    assert printable("größe/层") == "größe/层"
    assert printable("a\x1b[31mred\x07") == "a\\x1b[31mred\\x07"
    assert printable("x\ny\tz\x7f") == "x\\x0ay\\x09z\\x7f"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert printable("\x9b2J") == "\\x9b2J"


def test_markup_safe_escapes_rich_markup():
    from rich.console import Console

    c = Console(record=True, width=200, color_system=None)
    c.print(f"[bold]{markup_safe('[link=https://x.example]click[/link] [/]')}[/]")
    assert "[link=https://x.example]click[/link] [/]" in c.export_text()
