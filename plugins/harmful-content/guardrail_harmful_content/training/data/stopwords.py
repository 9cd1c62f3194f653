"""Function words: everything that is not a noun, verb or adjective in the FineHarm sense.

spaCy is not available offline here, so "content word" means an alphanumeric word with at least
one letter that is not in this list. The list holds determiners, pronouns, prepositions,
conjunctions, auxiliaries and modals, negations, common adverbs and discourse words.
"""

from __future__ import annotations

__all__ = ["STOPWORDS"]

STOPWORDS: frozenset[str] = frozenset("""
a about above across after afterwards again against all almost alone along already also although
always am among amongst an and another any anybody anyhow anyone anything anyway anywhere are
around as at back be became because been before beforehand behind being below beside besides
between beyond both but by can cannot could did do does doing done down during each either else
elsewhere enough etc even ever every everybody everyone everything everywhere except few for
from further furthermore had has have having he hence her here hereafter hereby herein hers
herself him himself his how however i if in indeed instead into is it its itself just least less
may me meanwhile might mine more moreover most mostly much must my myself namely neither never
nevertheless next no nobody none noone nor not nothing now nowhere of off often on once one only
onto or other others otherwise our ours ourselves out over own per perhaps please quite rather
really same several shall she should since so some somebody somehow someone something sometime
sometimes somewhat somewhere still such than that the their theirs them themselves then thence
there thereafter thereby therefore therein thereupon these they this those though through
throughout thru thus to together too toward towards under until up upon us very via was we well
were what whatever when whence whenever where whereafter whereas whereby wherein whereupon
wherever whether which while whither who whoever whole whom whose why will with within without
would yet you your yours yourself yourselves
i'm i've i'll i'd you're you've you'll you'd he's she's it's we're we've we'll they're they've
they'll that's there's here's what's let's can't cannot won't don't doesn't didn't isn't aren't
wasn't weren't hasn't haven't hadn't shouldn't wouldn't couldn't mustn't
im ive dont doesnt didnt isnt arent wasnt cant wont
ok okay yes sure oh
""".split())
