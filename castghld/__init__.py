"""castghld: Cast (Philippine SMS API) as the SMS provider of GoHighLevel sub-accounts.

One Tornado process, file-based encrypted state, no external database. README.md's "Map"
says which module owns what.
"""

__version__ = "0.1.0"
