"""Japanese era (和暦) dates for documents: 令和8年11月23日 14:05 JST."""

from __future__ import annotations

import datetime as dt

__all__ = ["JST", "format_japanese_datetime", "japanese_era_year"]

JST = dt.timezone(dt.timedelta(hours=9), "JST")  # Japan has no daylight saving time

# (first day, era name), newest first.
_ERAS: tuple[tuple[dt.date, str], ...] = (
    (dt.date(2019, 5, 1), "令和"),
    (dt.date(1989, 1, 8), "平成"),
    (dt.date(1926, 12, 25), "昭和"),
)


def japanese_era_year(day: dt.date) -> str:
    """``令和8年`` for 2026; the first year of an era is 元年 (令和元年)."""
    for start, name in _ERAS:
        if day >= start:
            year = day.year - start.year + 1
            return f"{name}{'元' if year == 1 else year}年"
    raise ValueError(f"date before 昭和: {day.isoformat()}")


def format_japanese_datetime(moment: dt.datetime) -> str:
    """Format an aware datetime in JST as ``令和8年11月23日 14:05 JST``.

    :raises ValueError: ``moment`` is naive (a signing time must never be ambiguous).
    """
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    local = moment.astimezone(JST)
    return f"{japanese_era_year(local.date())}{local.month}月{local.day}日 {local:%H:%M} JST"
