"""castghld: Cast (Philippine SMS API) as the SMS provider of GoHighLevel sub-accounts.

One Tornado process, file-based encrypted state, no external database. See README.md.
"""

__version__ = "0.1.0"
