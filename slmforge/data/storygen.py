"""An offline story writer driven by the TinyStories seeding formula (Eldan & Li, 2023).

TinyStories asked GPT-3.5/4 for a 3-5 paragraph story in a 3-year-old's words that uses a random verb, noun and
adjective from a basic vocabulary and has a random subset of features (dialogue, bad ending, ...). We are
offline, so the "teacher" here is a pure-Python writer that follows the same prompt: `sample_seed` draws the
formula exactly as TinyStories did, `StorySeed.prompt()` spells it out (so an LLM teacher can replace
`write_story` later), and `write_story` composes a story from interchangeable parts.

How a story is put together (so that a small LM sees grammar and structure, not a handful of templates):
  cast      a hero (child, animal or storybook person), a friend, a parent, a helper, a place, an item the plot
            turns on, a creature and a snack; the seed noun takes whichever of these roles its category fits
            (or gets a line of its own: the weather, a body part, a time of day), and the seed adjective attaches
            to something it can truly describe (feelings to the hero, tastes to the snack, colours to the item).
  plot      one of several arcs (lost, broken, sharing, stuck, scared, storm, disobeying) laid out as setup,
            trigger, problem, resolution and ending; each feature swaps or adds parts: dialogue turns narration
            into quoted exchanges, conflict adds an argument, foreshadowing plants a hint that the problem
            pays off, a plot twist replaces the resolution, a bad ending replaces it with a sad one, a moral
            value closes with a lesson.
  phrasing  every part has several wordings and is filled with random names, places, times and things,
            so distinct sentences keep growing with the corpus.
Grammar is handled by construction: articles are computed (`_a`), verb forms come from the vocabulary, pronouns
come from the character, and each sentence is capitalised after filling.
Everything is seeded from (seed, index), so a run can resume at any index and get the same stories.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from slmforge.data.basic_vocab import (
    ADJECTIVE,
    ADJECTIVES,
    BOY_NAMES,
    GIRL_NAMES,
    NOUN,
    NOUNS,
    PET_NAMES,
    VERB,
    VERBS,
    Noun,
    Verb,
)
from slmforge.data.basic_vocab import by_cat as _by_cat

by_cat = cache(_by_cat)   # the vocabulary is fixed, so each category list is built once

FEATURES = ("dialogue", "bad ending", "moral value", "plot twist", "foreshadowing", "conflict")

PROMPT = (
    "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old child would likely "
    "understand. The story should use the verb '{verb}', the noun '{noun}' and the adjective '{adjective}'. "
    "The story should have the following features: {features}. Remember to only use simple words!"
)


# --- the seeding formula ---------------------------------------------------------------------------------------

@dataclass
class StorySeed:
    """The TinyStories seeding formula for one sample: three words, some features, and the writer's seed."""

    verb: str
    noun: str
    adjective: str
    features: list[str]
    seed: int

    def prompt(self) -> str:
        """The TinyStories prompt for this seed, as one would send it to an LLM teacher."""
        return PROMPT.format(verb=self.verb, noun=self.noun, adjective=self.adjective,
                             features=", ".join(self.features))


_M64 = (1 << 64) - 1


def _mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): one independent stream per story, so index k needs nothing before it."""
    z = ((seed & _M64) * 0x9E3779B97F4A7C15 + (index & _M64) + 0x632BE59BD9B4E019) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sample_seed(index: int, seed: int = 0) -> StorySeed:
    """Draw the verb, noun, adjective and 1-3 features for story `index` (deterministic per (seed, index))."""
    rng = random.Random(_mix(seed, index))
    verb, noun, adj = rng.choice(VERBS).base, rng.choice(NOUNS).word, rng.choice(ADJECTIVES).word
    k = rng.choices((1, 2, 3), weights=(4, 4, 2))[0]
    features = [FEATURES[i] for i in sorted(rng.sample(range(len(FEATURES)), k))]
    return StorySeed(verb, noun, adj, features, rng.getrandbits(63))


def sample_seeds(n: int, seed: int = 0, start: int = 0) -> Iterator[StorySeed]:
    for i in range(start, start + n):
        yield sample_seed(i, seed)


def generate_stories(n: int, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """n stories as dicts {"text", "verb", "noun", "adjective", "features", "seed"} (story index start..start+n-1)."""
    for s in sample_seeds(n, seed, start):
        yield {"text": write_story(s), "verb": s.verb, "noun": s.noun, "adjective": s.adjective,
               "features": list(s.features), "seed": s.seed}


def write_story(s: StorySeed) -> str:
    """The offline teacher: a 3-5 paragraph story that follows the seed's prompt (deterministic given s)."""
    return _Writer(s).write()


# --- grammar helpers -------------------------------------------------------------------------------------------

_A_BEFORE_VOWEL = ("uni", "use", "usu", "eu", "one", "once", "ewe", "u-")   # "a unicorn", "a useful"
_AN_BEFORE_H = ("hour", "honest", "honor", "heir")                        # "an hour"


def _a(phrase: str) -> str:
    """Prefix the right indefinite article: "an apple", "a unicorn", "an hour"."""
    w = phrase.lower()
    if w.startswith(_AN_BEFORE_H) or (w[0] in "aeiou" and not w.startswith(_A_BEFORE_VOWEL)):
        return "an " + phrase
    return "a " + phrase


# Characters introduced on first mention ("a shy fox", later "the fox") are written as marker characters and
# resolved when the story is laid out, so the first mention in reading order is the one that introduces.
_MARK_HELPER, _MARK_CREATURE = "\x01", "\x03"
_UPPER = {"\x01": "\x02", "\x03": "\x04"}    # the marker that stands at a sentence start


def _cap(s: str) -> str:
    """Capitalise the first letter, also when the sentence opens with a quote (or a marker)."""
    i = 1 if s[0] == '"' else 0
    return s[:i] + _UPPER.get(s[i], s[i].upper()) + s[i + 1:]


class _Char:
    """A story character: how the narration names them and which pronouns they take."""

    __slots__ = ("name", "male", "kind", "noun", "he", "him", "his", "self")

    def __init__(self, name: str, male: bool, kind: str, noun: str) -> None:
        self.name, self.male, self.kind, self.noun = name, male, kind, noun   # kind: kid animal adult family
        self.he, self.him, self.his, self.self = (("he", "him", "his", "himself") if male
                                                  else ("she", "her", "her", "herself"))


# --- the cast: which nouns can play which part ------------------------------------------------------------------

_HERO_PERSONS = {"boy", "girl", "kid", "child", "prince", "princess", "king", "queen", "fairy", "mermaid", "elf",
                 "knight", "pirate", "wizard", "witch", "giant", "clown", "cowboy", "dancer", "singer", "artist"}
_HELPER_ANIMALS = ("owl", "turtle", "bear", "dog", "horse", "elephant", "rabbit", "squirrel", "goose", "cat")
_HELPER_PEOPLE = ("farmer", "neighbor", "teacher", "baker", "gardener", "police officer", "firefighter", "man",
                  "woman", "lady", "mailman", "zookeeper", "shopkeeper", "librarian", "fisherman", "doctor")
_ADULT_ADJ = ("kind", "old", "tall", "friendly", "nice", "smiling", "gentle", "wise", "busy", "happy")

# Where each kind of animal can plausibly be met, and which animals live near each place.
_HABITAT = {
    "pet": ("park", "yard", "garden", "backyard", "street", "field", "playground"),
    "farm": ("farm", "barn", "field", "meadow"),
    "forest": ("forest", "woods", "meadow", "hill", "field", "garden", "park"),
    "pond": ("pond", "lake", "river", "stream", "swamp"),
    "sea": ("beach", "sea", "ocean", "island", "harbor"),
    "jungle": ("jungle", "zoo"),
    "garden": ("garden", "park", "meadow", "field", "yard", "backyard", "orchard"),
    "sky": ("park", "garden", "field", "meadow", "forest", "yard", "beach"),
    "cold": ("zoo", "beach", "sea"),
    "desert": ("desert", "zoo"),
    "magic": ("castle", "forest", "cave", "mountain", "woods", "island"),
}
_PLACE_ANIMALS: dict[str, list[str]] = {}
for _sub, _places in _HABITAT.items():
    for _p in _places:
        _PLACE_ANIMALS.setdefault(_p, []).append(_sub)

_WINGED = {"bird", "robin", "crow", "pigeon", "eagle", "sparrow", "bluebird", "owl", "duck", "goose", "swan",
           "chicken", "hen", "parrot", "seagull", "bee", "butterfly", "ladybug", "dragonfly", "bat", "duckling"}
_PAWED = {"dog", "puppy", "cat", "kitten", "bunny", "rabbit", "bear", "cub", "fox", "wolf", "mouse", "raccoon",
          "squirrel", "lion", "tiger", "panda", "hamster", "koala", "hedgehog", "otter", "polar bear", "chipmunk"}

_PORTABLE = ("toy", "thing", "clothing", "nature")
_TEARS = {"paper", "book", "card", "letter", "note", "map", "photo", "ribbon", "stamp", "sticker", "envelope", "flag",
          "notebook", "bag", "net", "tent", "blanket", "towel", "kite", "drawing", "picture", "leaf", "petal", "feather"}
_NOT_CARRIED = {"sandcastle", "dollhouse", "rocking horse", "train set", "cage", "ladder", "tent", "suitcase"}
_SAFE_SPOTS = {"bed", "chair", "table", "sofa", "couch", "desk", "shelf", "drawer", "cupboard", "closet", "toy box",
               "bookcase", "dresser", "cushion", "rug", "mat", "bench", "stool", "carpet", "crib", "pillow"}
# What a mass noun comes in when it is the item of the story ("a jar of honey").
_CONTAINERS = {"bread": "loaf", "cheese": "piece", "candy": "bag", "chocolate": "bar", "popcorn": "bag",
               "cereal": "box", "honey": "jar", "jam": "jar", "butter": "piece", "flour": "bag", "sugar": "bag",
               "toast": "piece", "paint": "can", "money": "bag", "treasure": "box", "tape": "roll",
               "glue": "bottle", "soap": "bar", "medicine": "bottle", "thread": "spool", "yarn": "ball",
               "paper": "piece", "clay": "lump", "chalk": "piece", "cotton candy": "bag", "lettuce": "head",
               "rice": "bowl", "pasta": "bowl", "soup": "bowl", "yogurt": "cup", "pudding": "cup",
               "jelly": "jar", "corn": "bag", "broccoli": "bowl", "ice cream": "bowl"}

# Adjective roles: what the seed adjective describes in the story.
_ADJ_ROLE = {"feel+": "feel_good", "feel-": "feel_bad", "feel0": "feel", "trait+": "trait", "trait-": "trait",
             "size": "thing", "colour": "thing", "texture": "thing", "shape": "thing", "taste": "food",
             "temp": "day", "sound": "noise", "look": "thing", "state": "thing", "scene": "place",
             "wild": "animal", "light": "place", "weather": "day", "speed": "speed"}
_ADJ_ROLE_WORD = {"wonderful": "day", "amazing": "day", "great": "day", "perfect": "day", "exciting": "day",
                  "interesting": "day", "boring": "day", "scary": "place", "spooky": "place", "quiet": "place",
                  "glowing": "thing", "dark": "place", "bright": "day", "dim": "place", "lost": "animal",
                  "crunchy": "food", "gooey": "food", "sticky": "food", "fresh": "food", "frozen": "food",
                  "deep": "side", "wide": "side", "narrow": "side", "enormous": "side"}
# Things for adjectives that fit little in a child's hands: "a deep puddle", "a narrow path".
_SIDE_THINGS = {"deep": ("puddle", "hole", "pond"), "wide": ("river", "path", "field"), "narrow": ("path", "bridge"),
                "enormous": ("tree", "rock", "pumpkin")}
# Which noun categories an object adjective can describe, by adjective category, then per word.
_FITS_CAT = {
    "size": {"toy", "thing", "clothing", "food", "nature", "vehicle", "animal"},
    "colour": {"toy", "thing", "clothing", "vehicle", "nature", "animal"},
    "look": {"toy", "thing", "clothing", "vehicle", "nature"},
    "state": {"toy", "thing", "vehicle"},
    "texture": {"toy", "clothing", "animal"},
    "shape": {"toy", "thing", "nature"},
}
_FITS_WORD: dict[str, set[str]] = {
    **dict.fromkeys(("hard", "smooth", "rough", "bumpy", "lumpy", "flat"), {"nature", "toy", "thing"}),
    **dict.fromkeys(("sticky", "gooey", "squishy", "crunchy"), {"food", "toy"}),
    **dict.fromkeys(("slimy", "prickly", "spiky", "scratchy"), {"animal", "nature"}),
    **dict.fromkeys(("wet", "dry", "muddy", "dusty", "sandy", "slippery", "dirty", "clean", "messy"),
                    {"toy", "thing", "clothing", "nature", "vehicle", "animal"}),
    **dict.fromkeys(("crinkly", "wrinkly", "torn", "tangled"), {"thing", "clothing"}),
    **dict.fromkeys(("stinky", "smelly", "yucky", "ugly"), {"thing", "clothing", "food", "animal", "toy"}),
    **dict.fromkeys(("wooden", "plastic", "heavy", "light", "empty", "hidden", "real", "fake", "useful"),
                    {"toy", "thing"}),
    **dict.fromkeys(("bouncy", "stretchy", "squeaky"), {"toy"}),
    **dict.fromkeys(("loose", "tight", "puffy"), {"clothing"}),
    **dict.fromkeys(("frozen", "fresh"), {"food", "nature"}),
    **dict.fromkeys(("soft", "fluffy", "fuzzy", "furry", "silky", "shaggy"), {"toy", "clothing", "animal"}),
    "broken": {"toy", "thing", "vehicle"},
    "curly": {"animal", "clothing"}, "round": {"toy", "thing", "nature", "food"}, "square": {"thing", "toy"},
}
_TASTE_DRINK = {"sweet", "sour", "fizzy", "yummy", "tasty", "delicious", "fresh", "creamy", "minty", "sugary"}

# Verb kinds that react to trouble (crying) vs. to fun (laughing).
_SAD_REACT = {"cry", "sob", "weep", "tremble", "shiver", "whimper", "sniffle", "frown", "pout", "scream", "sigh", "shake"}


def _noun_kind(n: Noun) -> str:
    """The part a seed noun plays: hero, friend, helper, creature, item, snack, place, spot or a scene line."""
    c = n.cat
    if c in ("toy", "thing", "clothing") or (c == "nature" and n.word not in _SCENE_NATURE):
        return "item"
    if c == "vehicle":
        return "item" if n.sub == "ride" else "vehicle"
    return {"animal": "creature", "person": "person", "family": "family", "food": "snack", "drink": "snack",
            "furniture": "spot", "place": "place", "nature": "scene", "sky": "sky", "weather": "weather",
            "body": "body", "time": "time", "event": "event", "idea": "idea"}[c]


# --- sentence banks --------------------------------------------------------------------------------------------
# Keys: {H} hero, {he} {him} {his} {self}; {F} friend, {fhe} {fhim} {fhis}; {M} parent, {mhe} {mhis};
# {P} helper (first use reads "a kind farmer", later "the farmer"); {the_creature} likewise; item: {aitem}
# "a red ball", {the_item} "the ball", {his_item} "her ball", {his_ditem} "her red ball"; {the_place}
# {at_place} {to_place}; {A} the seed adjective; {V} a verb phrase prepared for the sentence.

_OPENINGS = (
    "Once upon a time, there was {ahero} named {H}.",
    "Once upon a time, there lived {ahero} named {H}.",
    "There was once {ahero} named {H}.",
    "Once there was {ahero} called {H}.",
    "Once upon a time, {ahero} named {H} lived {home}.",
    "{H} was {ahero} who lived {home}.",
    "In {atown}, there lived {ahero} named {H}.",
    "Not long ago, there was {ahero} named {H}.",
)
_HOME_LINES = ("{H} lived {home}.", "{H} lived {home} with {his} family.", "{his} home was {homeplain}.")
_HOBBY = ("{H} loved to {V}.", "Every day, {H} liked to {V}.", "More than anything, {H} liked to {V}.",
          "{his} favorite thing to do was to {V}.", "{H} liked to {V} with {his} friends.",
          "When the sun was out, {H} liked to {V}.")
_FRIEND_INTRO = {
    "kid": ("{H} had a best friend named {F}.", "{his} best friend was {fdesc} named {F}.",
            "{F} was {H}'s best friend.", "{H}'s friend {F} lived next door.",
            "{H} and {F} were best friends."),
    "sibling": ("{H} had {fdesc} named {F}.", "{H} lived with {his} {fnoun}, {F}.",
                "{his} {fnoun}, {F}, was always with {him}."),
    "family": ("{H} lived with {his} {fnoun}.", "{H} loved {his} {fnoun} very much.",
               "{his} {fnoun} lived in a little house close by.", "{H} spent every day with {his} {fnoun}."),
    "animal": ("{H} had {fdesc} named {F}.", "{his} best friend was {fdesc} named {F}.",
               "{H} and {fdesc} named {F} were best friends."),
}
_ITEM_INTRO = {
    "toy": ("{H} had {aitem} that {he} loved very much.", "{H}'s favorite toy was {his_ditem}.",
            "{H} loved {his_ditem} more than anything.", "{H} had {aitem}. {he} took it everywhere.",
            "For {his} birthday, {H} got {aitem}.", "{M} had given {H} {aitem}, and {he} played with it every day."),
    "thing": ("{H} had {aitem} that {he} liked very much.", "{H} had {aitem}. {he} kept it with {him} all the time.",
              "{H}'s favorite thing was {his_ditem}.", "{M} had given {H} {aitem}, and {he} took great care of it.",
              "{H} found {aitem} in the attic and kept it."),
    "clothing": ("{H} had {aitem} that {he} wore every day.", "{M} gave {H} {aitem} to wear.",
                 "{H} loved {his_ditem} and wore it everywhere.", "{H}'s grandma made {him} {aitem}."),
    "nature": ("{H} had {aitem} that {he} found one day.", "{H} kept {aitem} in a little box by {his} bed.",
               "{H}'s favorite thing was {aitem} from the garden.", "{H} had found {aitem} and loved it."),
    "ride": ("{H} had {aitem}. {he} rode it every day.", "{H} got {aitem} for {his} birthday.",
             "{H} loved to ride {his_ditem}."),
}
_TIME = ("One day,", "One morning,", "One afternoon,", "The next day,", "One {day} day,", "One {day} morning,",
         "Early one {day} morning,", "One {day} afternoon,", "On {aday} day,", "That day,", "One {day} day,")
_GO = ("{H} and {F} went {to_place}.", "{H} went {to_place} with {F}.", "{H} and {F} decided to go {to_place}.",
       "{F} asked {H} to come {to_place}.", "{H} and {F} walked {to_place} together.",
       "{M} took {H} and {F} {to_place}.")
_BRING = (" {H} brought {the_item} along.", " {H} took {his_item} with {him}.", " {H} did not forget {his_item}.",
          " {H} put {his_item} in {his} bag.", "")
_ARRIVE = ("{at_place}, they played and played.", "They had lots of fun {at_place}.", "{H} ran around and laughed.",
           "{at_place}, there was so much to see.", "They played a game of tag.", "{H} looked all around.",
           "{at_place}, {H} and {F} played hide and seek.", "They found a nice spot {at_place} to play.",
           "{F} showed {H} a funny new game.", "There were lots of things to do {at_place}.")
_ARRIVE_OUT = ("{at_place}, the air was fresh and the birds were singing.", "The sun was warm {at_place}.",
               "{at_place}, the flowers were pretty and the grass was green.")
# Where a lost thing can hide, by kind of place.
_NOOKS = {
    "out": ("under a big leaf", "behind a tree", "in the tall grass", "next to a rock", "under a bush", "by the gate",
            "near the path", "behind a log"),
    "water": ("in the sand", "behind a big rock", "under a towel", "next to the water", "by an old boat",
              "under a pile of shells", "near the big rock"),
    "town": ("under a bench", "behind a big box", "by the door", "next to the steps", "under a table",
             "behind a flower pot", "near the gate"),
}

# Dialogue: how a line is attributed to its speaker.
_SAY_PLAIN = ("said", "said", "said", "replied", "whispered")
_SAY_BANG = ("said", "shouted", "cried", "yelled", "said")

# --- plots: each stage has narration and (with the dialogue feature) quoted lines -------------------------------

_LOST = {
    "goal": ("{H} wanted to show {the_item} to everyone {at_place}.", "{H} played with {the_item} all morning.",
             "{H} held {the_item} tight and ran ahead."),
    "hints": (("There was a small hole in {H}'s bag, but {he} did not see it.",
               "{the_item} had fallen out through the little hole in {his} bag!"),
              ("{M} told {H} to keep {his_item} close so {he} would not lose it.",
               "{H} remembered what {M} had said, and {his} cheeks got red."),
              ("{the_creature} watched {the_item} with big eyes, but {H} did not notice.",
               "{H} thought about the animal that had watched {the_item} so closely.")),
    "trigger": ("After a while, {H} looked for {the_item}, but it was gone.",
                "When it was time to go home, {H} could not find {the_item} anywhere.",
                "{H} put {the_item} down to play. When {he} came back, it was not there!",
                "Then {H} reached for {his_item}, but {his} hands were empty."),
    "trigger_oops": ("Now {the_item} was nowhere to be seen.", "After that, {H} could not find {the_item}."),
    "sad": ("{H} was very sad.", "{H}'s eyes filled with tears.", "{H} did not know what to do.",
            "{H} felt a big lump in {his} throat."),
    "lines": ((("H", "Oh no! Where is my {item}?"), ("F", "Don't worry. We will find it.")),
              (("H", "My {item} is gone!"), ("F", "Let's look for it together.")),
              (("H", "I can't find my {item} anywhere!"), ("F", "Maybe it is {nook2}."), ("H", "Let's go look.")),
              (("F", "What's wrong, {H}?"), ("H", "I lost my {item}!"))),
    "search": ("{H} and {F} looked high and low.", "They looked everywhere {at_place}.",
               "They looked {nook2}, but it was not there.", "{F} helped {H} look {nook2}.",
               "They looked {nook2} and {nook3}, but they did not find it."),
    "solve": ("Just then, {P} came by and asked what was wrong. {phe} helped them look, and soon they found "
              "{the_item} {nook}.",
              "At last, {F} shouted and pointed. {the_item} was {nook}!",
              "{P} had found {the_item} and was keeping it safe. {phe} gave it back to {H}.",
              "They looked one more time, and there it was, {nook}!"),
    "lines_solve": ((("P", "Is this your {item}?"), ("H", "Yes! Thank you so much!")),
                    (("F", "I found it!"), ("H", "My {item}! You are the best!")),
                    (("H", "There it is!"), ("F", "Hooray!"))),
    "twist": ("But then {H} saw something that surprised {him}. {the_creature} was playing with {the_item}! "
              "It had taken it all along.",
              "Then {H} got a big surprise. {the_item} had been in {his} own pocket the whole time!",
              "To everyone's surprise, it turned out {F} had picked it up to keep it safe and then forgot.",
              "Then came a surprise. {the_creature} came running with {the_item} and dropped it at "
              "{H}'s feet."),
    "twist_bad": ("Then {H} got a surprise. {the_creature} had taken {the_item} to its nest, high up where nobody could "
                  "reach it. {H} never got it back.",
                  "To everyone's surprise, {F} had found {the_item} long ago, but {fhe} had lost it again on the way."),
    "bad": ("They looked and looked until it got dark, but they never found {the_item}.",
            "They looked all day, but {the_item} was gone for good.",
            "{H} never saw {his_item} again."),
    "end": ("From then on, {H} kept {the_item} close.", "{H} held {his_item} tight all the way home.",
            "That night, {H} put {the_item} safely by {his} bed.", "{H} never let go of {his_item} again."),
    "lessons": ("careful", "never give up", "help"),
}
_BROKEN = {
    "goal": ("{H} and {F} played with {the_item} {at_place}.", "{H} showed {the_item} to {F}.",
             "{F} wanted to see {H}'s {item}, so {H} let {fhim} hold it."),
    "hints": (("{H} saw a tiny crack in {the_item}, but {he} kept on playing.",
               "The tiny crack {H} had seen before got bigger and bigger."),
              ("{M} said {the_item} was old, so {H} had to be gentle with it.",
               "{H} remembered {M}'s words, but it was too late.")),
    "trigger": ("{F} wanted a turn and pulled too hard. Snap! {the_item} {broke}.",
                "{the_item} fell on the hard ground and {broke}.",
                "{H} threw {the_item} too high. It came down with a crash and {broke}.",
                "{F} stepped on {the_item} by mistake. Crack! It {broke}."),
    "trigger_oops": ("{the_item} fell out of {his} hands and {broke}.", "Then {H} saw that {the_item} had {broke_pp}."),
    "sad": ("{H} was very upset.", "{H} looked at the pieces and wanted to cry.", "{H}'s lip began to shake.",
            "Now {the_item} was {broken}."),
    "lines": ((("H", "My {item}! It's {broken}!"), ("F", "I'm sorry. I did not mean to do it.")),
              (("H", "Now I can't play with it!"), ("F", "Maybe we can fix it.")),
              (("F", "Oh no, what do we do now?"), ("H", "I don't know."))),
    "search": ("They tried to put the pieces back together, but it did not work.",
               "{F} looked at the pieces and did not know what to do."),
    "solve": ("{P} saw them and came over. {phe} fixed {the_item} with some glue and tape. It was as good as new!",
              "{H} and {F} took {the_item} to {P}. {phe} helped them fix it, one piece at a time.",
              "{M} got some glue, and together they fixed {the_item}."),
    "lines_solve": ((("P", "Let me help you fix it."), ("H", "Thank you!")),
                    (("H", "It looks as good as new!"), ("F", "Hooray!")),
                    (("F", "I'm sorry I {broke} it."), ("H", "That's okay. It was an accident."))),
    "twist": ("But then they found out something surprising. It was not {F} who {broke} it. It was "
              "{the_creature}, who had knocked it over!",
              "Then {P} had a surprise. {phe} opened a box, and inside was a new {item}, just like the old one!",
              "To everyone's surprise, when they fixed {the_item}, it looked even better than before."),
    "twist_bad": ("Then came a surprise: it was not {F} who {broke} it, but {the_creature}. But that did not help. "
                    "{the_item} was {broken}, and nobody could fix it.",),
    "bad": ("Nobody could fix {the_item}. {H} put the pieces in a box and cried.",
            "They tried and tried, but {the_item} could not be fixed. It stayed {broken} forever.",
            "{the_item} was {broken}, and it could never be the same again."),
    "end": ("From then on, {H} and {F} played with {the_item} very gently.", "{H} took good care of {the_item}.",
            "{H} and {F} played with {the_item} all afternoon."),
    "lessons": ("careful", "sorry"),
}
_SHARE = {
    "goal": ("{H} brought {the_item}, and {F} wanted a turn right away.",
             "{F} saw {H}'s {item} and wanted to play with it too.",
             "{F} asked if {fhe} could play with {the_item}."),
    "goal_new": ("{at_place}, {H} and {F} found {aitem} on the ground. They both wanted it.",
                 "{H} and {F} saw {aitem} {nook}. They both ran to get it."),
    "hints": (("{F} looked at {the_item} and frowned, but {fhe} did not say anything.",
               "Now {H} knew why {F} had frowned at {the_item} before."),
              ("{M} always said that toys are more fun when you play together.",
               "{H} thought about what {M} always said.")),
    "trigger": ("But {F} grabbed {the_item} first and would not let go.",
                "{H} and {F} both grabbed {the_item} at the same time.",
                "{H} did not want to share. {he} hid {the_item} behind {his} back.",
                "{H} held {the_item} tight and said no."),
    "trigger_oops": ("Then they both reached for {the_item} at the same time.",),
    "sad": ("{F} started to cry.", "Nobody was having fun anymore.", "{H} felt bad inside."),
    "lines": ((("F", "It's mine!"), ("H", "No, it's mine! I saw it first!")),
              (("H", "Can I have a turn?"), ("F", "No! I want to play with it!")),
              (("F", "Give it to me!"), ("H", "That's not fair!"))),
    "search": ("They pulled and pulled.", "They both held on tight.", "{F} stomped {fhis} feet."),
    "solve": ("Then {H} had an idea. They could take turns! First {H} played with {the_item}, and then {F} did.",
              "{P} saw them and said they could play with it together. So they did, and it was much more fun.",
              "{H} thought for a moment. Then {he} gave {the_item} to {F} and said {fhe} could go first."),
    "lines_solve": ((("H", "Let's take turns!"), ("F", "Okay! You can go first.")),
                    (("P", "Why don't you play with it together?"), ("H", "That's a good idea!")),
                    (("H", "You can play with it too."), ("F", "Thank you, {H}!"))),
    "twist": ("Then came a big surprise. {P} walked over and said {the_item} was {phis}! {phe} had lost it there "
              "that morning.",
              "But then {F} laughed and said a surprising thing: {fhe} had bought {the_item} as a gift for {H} "
              "all along!",
              "Then {H} got a surprise. There was another {item} just like it, hidden {nook2}!"),
    "twist_bad": ("Then came a surprise. {P} walked over and said {the_item} was {phis}! {phe} took it away, and now "
                   "nobody had it.",),
    "bad": ("They pulled so hard that {the_item} {broke}. Now nobody could play with it.",
            "They pulled and pulled until {the_item} flew out of their hands and landed in the mud. It was ruined.",
            "{F} got so mad that {fhe} went home. {H} had {the_item}, but {he} had no one to play with."),
    "end": ("After that, {H} and {F} always shared their toys.", "They played together until the sun went down.",
            "{H} and {F} were best friends again."),
    "lessons": ("share", "kind"),
}
_STUCK = {
    "goal": ("{H} and {F} played with {the_item} {at_place}.", "{H} threw {the_item} up high, and {F} tried to catch it.",
             "{H} tossed {the_item} in the air again and again."),
    "hints": (("There was a tall old tree with long branches {at_place}.",
               "It was the tall old tree with the long branches!"),
              ("The wind was getting stronger, but {H} did not mind.",
               "The strong wind had carried it away!")),
    "trigger": ("Then {H} threw {the_item} too high. It got stuck up in a tree!",
                "A gust of wind came and blew {the_item} into the top of a tall tree!",
                "{the_item} flew up and landed on a high branch. It was stuck."),
    "trigger_oops": ("{the_item} flew up and got stuck in a tree!",),
    "sad": ("{H} tried to reach it, but {he} was too small.", "{H} jumped and jumped, but it was too high.",
            "{H} looked up at {the_item} and sighed."),
    "lines": ((("H", "How will we get it down?"), ("F", "It's too high!")),
              (("H", "I want my {item} back!"), ("F", "Let's get help.")),
              (("F", "Can you reach it?"), ("H", "No, I'm too small."))),
    "search": ("{F} tried to throw a stick at it, but {fhe} missed.", "They tried to shake the tree, but it did not move."),
    "solve": ("Then {P} came by. {phe} got a long ladder and brought {the_item} down.",
              "{P} saw them and used a long stick to push {the_item} down.",
              "{H} ran to get {M}. {mhe} reached up high and got {the_item} down."),
    "lines_solve": ((("P", "Let me help you."), ("H", "Thank you!")), (("F", "You got it down!"), ("H", "Hooray!"))),
    "twist": ("Then, to their surprise, {the_creature} came and shook the branch, and {the_item} dropped right "
              "into {H}'s hands!",
              "Then something surprising happened. A little bird landed on the branch, and {the_item} fell down "
              "all by itself!"),
    "twist_bad": ("Then, to their surprise, {the_creature} climbed up and grabbed {the_item}. But it did not bring it "
                   "down. It ran off with it, and {H} never saw it again.",),
    "bad": ("Then the wind blew {the_item} far away over the trees. {H} never saw it again.",
            "They waited and waited, but {the_item} stayed stuck up high, and it got dark.",
            "When they came back the next day, {the_item} was gone."),
    "end": ("{H} hugged {the_item} and did not throw it so high again.",
            "They played with {the_item} on the ground for the rest of the day."),
    "lessons": ("help", "teamwork", "careful"),
}
_SCARED = {
    "goal": ("{H} and {F} wanted to explore {the_place}.", "{at_place}, {H} and {F} played with {the_item}.",
             "{H} and {F} walked deep into {the_place}."),
    "hints": (("{H} heard a soft rustle {nook2}, but {he} did not see anything.",
               "It was the same rustle {H} had heard before, only louder!"),
              ("{F} said {fhe} had seen something move in the shadows.",
               "{H} remembered that {F} had seen something move.")),
    "trigger": ("Suddenly, they heard {anoise} {nook}. Something was moving!",
                "Then a big dark shadow moved, and they heard {anoise}.",
                "All of a sudden, there was {anoise} {nook}."),
    "trigger_oops": ("Then they heard {anoise}.",),
    "sad": ("{H} was scared.", "{H} stayed close to {F}.", "{F} wanted to run home."),
    "lines": ((("F", "What was that?"), ("H", "I don't know. Let's go look.")),
              (("F", "I'm scared!"), ("H", "Me too. Let's be brave.")),
              (("H", "Is it a monster?"), ("F", "I hope not!"))),
    "search": ("They tiptoed closer.", "{H} took a deep breath.", "Slowly, they walked toward the sound."),
    "solve": ("{H} was brave and looked {nook}. It was only {the_creature}! It was lost and scared too.",
              "They peeked, and there was {the_creature}. It was hungry, so {H} gave it a snack, and they "
              "became friends.",
              "{P} came with a flashlight. It was just {the_creature} looking for its home."),
    "lines_solve": ((("H", "It's only a little animal!"), ("F", "Hello, little friend!")),
                    (("H", "Don't be scared."), ("F", "It is so cute!"))),
    "twist": ("But it was not a monster at all. It was {P}, with a big surprise for them!",
              "It turned out that the big, scary shadow was only {the_creature} standing on a log!",
              "It was {the_creature}, and to their surprise, it had {H}'s old lost hat on its head!"),
    "twist_bad": ("But it was not a monster at all. It was just {the_creature}! To their surprise, it grabbed {H}'s "
                    "{item} and ran off with it.",),
    "bad": ("They ran home so fast that {H} dropped {the_item}. {he} never found it again.",
            "They ran away and never came back to {the_place}. {H} was scared for a long time.",
            "{H} tripped while running away and hurt {his} knee. {he} went home crying."),
    "end": ("After that, {H} and {F} went back to visit {the_creature} every day.",
            "{H} was not scared anymore.", "They walked home together, laughing about how scared they had been."),
    "lessons": ("brave", "looks"),
}
_STORM = {
    "goal": ("{H} and {F} had a picnic {at_place}.", "{H} and {F} played with {the_item} {at_place}.",
             "{H} and {F} flew a kite {at_place}."),
    "hints": (("Far away, {H} saw some dark clouds, but {he} did not think about them.",
               "The dark clouds were right above them now."),
              ("{M} said it might rain later.", "{H} remembered what {M} had said about the rain.")),
    "trigger": ("Soon, the sky got dark and big drops of rain began to fall.",
                "Then the wind began to blow, and the rain came down hard.",
                "Suddenly, there was a loud boom of thunder, and it started to rain."),
    "trigger_oops": ("Then it began to rain.",),
    "sad": ("They were getting all wet.", "{H} did not like the rain at all.", "{the_item} was getting wet!"),
    "lines": ((("F", "It's raining!"), ("H", "Quick, let's go!")),
              (("H", "My {item} is getting wet!"), ("F", "Hurry! Let's find a dry place.")),
              (("F", "Where can we go?"), ("H", "Over there!"))),
    "search": ("They ran to find a dry place.", "{H} held {the_item} close to keep it dry."),
    "solve": ("They ran under a big tree and waited. Soon, the rain stopped and a rainbow came out.",
              "{P} opened {phis} door and let them in. They stayed warm and dry until the rain stopped.",
              "They ran home, and {M} gave them warm towels and hot cocoa."),
    "lines_solve": ((("M", "Come inside, you two!"), ("H", "We're coming!")), (("H", "Look, a rainbow!"), ("F", "It's so pretty!"))),
    "twist": ("Under the tree, they found a surprise. {the_creature} was hiding from the rain too!",
              "When the rain stopped, they got a big surprise. The biggest rainbow they had ever seen was right "
              "over {the_place}!"),
    "twist_bad": ("Then they got a surprise. The storm had blown {the_item} into the river, and it floated far away.",),
    "bad": ("The rain washed {the_item} away. It was gone forever, and {H} went home wet and sad.",
            "The wind blew {the_item} away, and they never found it. The day was ruined.",
            "They got so wet and cold that {H} got sick and had to stay in bed for a week."),
    "end": ("{H} and {F} watched the rain from the window and smiled.",
            "The next day was sunny, and they went back to play."),
    "lessons": ("listen", "patient"),
}
_DISOBEY = {
    "goal": ("{M} told {H} not to take {the_item} {to_place}, but {H} did not listen.",
             "{M} said {H} must leave {the_item} at home. But {H} took it anyway.",
             "{M} told {H} to play gently with {the_item}. {H} said yes, but {he} forgot."),
    "hints": (("{M} said {the_item} could break if {H} was not careful.",
               "It was just what {M} had said would happen."),
              ("{H} had a funny feeling in {his} tummy, but {he} did not listen to it.",
               "Now {H} knew what that funny feeling had been about.")),
    "trigger": ("{at_place}, {H} played too wildly, and {the_item} fell and {broke}.",
                "{H} ran too fast and dropped {the_item}. Now it was dirty and {broken}.",
                "{H} swung {the_item} around and around, and it flew out of {his} hands and {broke}."),
    "trigger_oops": ("{the_item} fell and {broke}.", "Now {the_item} was dirty and {broken}."),
    "sad": ("{H} felt bad. {he} knew {he} had not listened.", "{H} looked at the mess and felt sorry.",
            "{H} did not want to tell {M}."),
    "lines": ((("H", "Oh no! What have I done?"), ("F", "{M} told you not to!")),
              (("H", "I should have listened."), ("F", "We have to tell {M}."))),
    "search": ("{H} tried to fix it, but it did not help.", "{H} walked home slowly.",
               "{H} hid {the_item} behind {his} back."),
    "solve": ("{H} told {M} the truth and said sorry. {M} hugged {him}, and together they cleaned up the mess.",
              "{H} said sorry to {M}. {M} was glad {H} told the truth, and {mhe} helped {him} make it right."),
    "lines_solve": ((("H", "I'm sorry. I should have listened to you."), ("M", "Thank you for telling me the truth.")),
                    (("H", "I'm sorry, {M}."), ("M", "It's okay. Everyone makes mistakes."))),
    "twist": ("But to {H}'s surprise, {M} was not angry at all. {mhe} laughed and said {mhe} did the same thing "
              "when {mhe} was little!",
              "Then came a surprise. {M} had seen it all from the window, and {mhe} had already fixed it!"),
    "twist_bad": ("But {M} had seen it all from the window. To {H}'s surprise, {mhe} was not angry, only sad. That "
                     "was even worse.",),
    "bad": ("{M} was very sad. {H} could not play outside for a whole week.",
            "{the_item} was ruined. {H} cried, but it was too late to fix it.",
            "{M} had to throw {the_item} away. {H} sat on {his} bed and cried."),
    "end": ("From then on, {H} always listened to {M}.", "{H} was careful with {the_item} from then on."),
    "lessons": ("listen", "honest"),
    "pre": True,   # the warning comes before the outing
}
_PLOTS = {"lost": _LOST, "broken": _BROKEN, "share": _SHARE, "stuck": _STUCK, "scared": _SCARED,
          "storm": _STORM, "disobey": _DISOBEY}
_PLOTS_FOR_ITEM = {
    "toy": tuple(_PLOTS), "thing": tuple(_PLOTS),
    "clothing": ("lost", "stuck", "share", "storm", "scared"),
    "nature": ("lost", "share", "stuck", "storm", "scared", "disobey"),
    "ride": ("broken", "share", "storm", "scared", "disobey", "lost"),
}

# Conflict: an argument between hero and friend (added to the problem), and how it heals.
_CONFLICT = (
    "{F} said it was all {H}'s fault. {H} said it was not! They began to argue.",
    "{H} and {F} could not agree on what to do. They argued and argued.",
    "{F} got angry and said {H} was not being fair. {H} got angry too.",
    "{H} wanted to do it one way, and {F} wanted to do it another way. Soon they were fighting.",
    "{F} pushed {H}, and {H} pushed back. Now they were both mad.",
    "{F} said {H} was being bossy. {H} said {F} was being mean. They started to argue.",
)
_CONFLICT_LINES = ((("F", "This is all your fault!"), ("H", "No, it's not!")),
                   (("F", "You never listen to me!"), ("H", "You never listen to me either!")),
                   (("H", "I don't want to play with you anymore!"), ("F", "Fine!")),
                   (("F", "My way is better!"), ("H", "No, my way is better!")))
_MAKE_UP = ("{H} and {F} said sorry to each other.", "They stopped fighting and gave each other a hug.",
            "{F} said sorry, and {H} said sorry too.", "They were not angry anymore.",
            "{H} held out {his} hand, and {F} took it. They were friends again.")
_MAKE_UP_LINES = ((("F", "I'm sorry I got mad."), ("H", "I'm sorry too. Friends?"), ("F", "Friends!")),
                  (("H", "I'm sorry, {F}."), ("F", "Me too.")))
_TWIST_LINES = ((("H", "I can't believe it!"), ("F", "What a surprise!")), (("F", "Wow! Who knew?"), ("H", "Not me!")),
                (("H", "Look at that!"), ("F", "Wow!")))
_TWIST_LINES_BAD = ((("H", "Oh no! Come back!"), ("F", "It's too late.")), (("H", "This can't be!"), ("F", "Oh no!")),
                    (("F", "What do we do now?"), ("H", "I don't know.")))
_GO_LINES = ((("H", "Can we go {to_place} today?"), ("M", "Yes, but be back before dinner.")),
             (("F", "Let's go {to_place}!"), ("H", "Yay! Let's go!")),
             (("H", "This is going to be fun!"), ("F", "The best day ever!")))

_HAPPY_END = ("{H} smiled a big smile.", "{H} and {F} laughed and went home together.",
              "It was the best day ever.", "That night, {H} went to sleep with a big smile.",
              "{H} gave {F} a big hug.", "They were very happy.", "{H} felt warm and happy inside.",
              "They played until the sun went down.", "{H} and {F} smiled at each other.",
              "It was a very good day.", "{H} could not stop smiling.", "Everyone was happy again.")
_SAD_END = ("{H} went to bed sad that night.", "It was a sad day for {H}.", "{H} cried all the way home.",
            "{H} sat by the window and felt very sad.", "Nothing could make {H} smile that day.",
            "{H} walked home slowly. {he} felt so sad.", "That night, {H} hugged {his} pillow and cried.")
# Everyday lines that lengthen a short story.
_FILLER = ("{H} picked a little flower.", "{F} told a funny joke, and {H} laughed.", "They sang a song together.",
           "{H} saw a butterfly and ran after it.", "{H} hummed a happy song.", "They stopped to rest for a while.",
           "{F} wanted to race, so they did.")

_LESSONS = {
    "careful": ("it is important to be careful with the things you love", "we should take care of our things",
                "being careful can stop a lot of trouble"),
    "never give up": ("you should never give up", "if you keep trying, good things can happen"),
    "help": ("it is good to ask for help", "friends help each other", "a problem is easier when you ask for help"),
    "sorry": ("saying sorry can fix a lot", "accidents happen, and it is good to forgive"),
    "honest": ("it is always best to tell the truth", "telling the truth is the right thing to do"),
    "share": ("sharing makes everyone happy", "it is more fun to share", "good friends share with each other"),
    "kind": ("being kind is the best way to be", "a little kindness goes a long way"),
    "teamwork": ("working together makes hard things easy", "friends can do more when they work together"),
    "brave": ("being brave can help you make new friends", "things are not always as scary as they seem"),
    "looks": ("you should not judge others by how they look", "something that looks scary can be a friend"),
    "listen": ("it is important to listen to your mom and dad", "grown-ups often know best"),
    "patient": ("good things come to those who wait", "it pays to be patient"),
}
_MORAL_FRAMES = ("{H} learned that {L}.", "That day, {H} learned that {L}.", "From that day on, {H} knew that {L}.",
                 "{H} learned an important lesson: {L}.", "{H} always remembered that {L}.",
                 "{M} told {H} that {L}, and {H} never forgot the lesson.")
_MORAL_FRAMES_SAD = ("{H} learned a hard lesson that day: {L}.", "It was a sad day, but {H} learned that {L}.",
                     "{H} learned that {L}, but it was too late.")

# --- seed-word lines: how each kind of seed word enters the story -----------------------------------------------

_VERB_LINES = {  # kind -> (paragraph, templates); {V} is the verb phrase in the form the template names
    "fun": ((0, ("{H} loved to {Vb}.", "Every day, {H} liked to {Vb}.", "{H} was very good at {Vi}.",
                 "More than anything, {H} loved {Vi}.")),
            (1, ("{at_place}, {H} and {F} {Vp_they} for a long time.", "First, they {Vp_they}.",
                 "{H} wanted to {Vb} with {F}.", "{F} showed {H} how to {Vb}."))),
    "work": ((0, ("{H} liked to help {M} {Vb}.", "Every morning, {H} helped {M} {Vb}.")),
             (1, ("Before they could go, {H} had to {Vb}.", "{M} asked {H} to {Vb} first.")),
             (4, ("Later, {H} helped {M} {Vb}.", "The next day, {H} {Vp} all by {self}."))),
    "kind": ((3, ("{H} decided to {Vb}.", "So {H} {Vp}.", "{H} was glad to {Vb}.")),
             (4, ("From then on, {H} always tried to {Vb}.", "After that, {H} liked to {Vb} every day."))),
    "bad": ((2, ("Then {F} began to {Vb_f}. {H} did not like that at all.", "{F} started to {Vb_f}, and that was "
                 "not nice.", "{H} got upset and began to {Vb}.")),),
    "oops": ((2, ("Oh no! {H} {Vp}.", "Suddenly, {H} {Vp}.", "{H} was not looking and {Vp}.",
                  "{H} was in such a hurry that {he} {Vp}.")),),
    "react": ((2, ("{H} began to {Vb}.", "{H} could not help it, and {he} began to {Vb}.",
                   "{H} sat down and began to {Vb}.")),),
    "joy": ((3, ("{H} began to {Vb}.", "{H} and {F} could not stop {Vi_they}.")),
            (4, ("{H} and {F} {Vp_they} all the way home.", "{H} {Vp} and hugged {F}."))),
    "still": ((1, ("First, {H} had to {Vb}.", "{M} told {H} to {Vb}.", "{H} did not want to {Vb}, but {he} did.")),
              (4, ("That night, {H} had to {Vb}.", "Later, {H} {Vp}."))),
    "mind": ((1, ("{H} wanted to {Vb}.", "{H} tried hard to {Vb}.", "{H} stopped to {Vb}.")),
             (3, ("{H} tried to {Vb}.", "{H} had to {Vb}."))),
    "state": ((0, ("{H} always {Vp}.", "{H} {Vp}.", "Like many kids, {H} {Vp}.")),),
    "sense": ((1, ("{at_place}, {H} {Vp}.", "{H} stopped to {Vb}.", "{H} liked to {Vb}.")),
              (4, ("On the way home, {H} {Vp}.",))),
    "plain": ((1, ("First, {H} had to {Vb}.", "{H} {Vp}.", "Then {H} {Vp}.")),
              (4, ("Later that day, {H} had to {Vb}.", "Later, {H} and {F} {Vp_they}."))),
}
# Verbs of the "still" kind that belong at the end of the day, or at its start.
_STILL_END = {"sleep", "nap", "rest"}
_STILL_START = {"wake"}

_ADJ_LINES = {  # adjective role -> (paragraph, templates); {A} is the adjective, {AA} "a/an" + adjective
    "feel_good": ((3, ("{H} felt so {A}.", "{H} was very {A}.", "Now {H} felt {A}.")),
                  (4, ("{H} felt {A} all day.", "It made {H} feel {A}.", "{H} was so {A}."))),
    "feel_bad": ((2, ("{H} felt {A}.", "{H} was very {A}.", "This made {H} feel {A}.", "{H} felt so {A}.")),),
    "feel": ((1, ("{H} felt {A}.", "That day, {H} was very {A}.", "{H} was {A}, but {he} did not mind.")),
             (2, ("{H} felt {A}.", "{H} was {A}."))),
    "speed": ((0, ("{H} was very {A}.", "Everyone knew that {H} was {A}.")),),
    "place": ((1, ("{the_place} was {A}.", "{at_place}, everything was {A}.", "It was {A} {at_place}.")),),
    "noise": ((2, ("Suddenly, they heard {AA} noise. It was only {the_creature}.",
                   "Then a {A} sound came from the bushes. It was just {the_creature}.")),),
    "day": ((1, ("It was {AA} day.", "The day was {A}.")),),
}
_DAY_ADJ = ("sunny", "bright", "warm", "windy", "cloudy", "cool", "nice", "lovely", "quiet", "beautiful")

_SKY = {
    "sun": ("The sun was warm and bright.", "The sun shone down on {the_place}."),
    "moon": ("That night, the moon was big and round.", "{H} looked up at the moon and smiled."),
    "star": ("That night, {H} made a wish on a star.", "{H} saw the first star in the sky."),
    "rainbow": ("After a little rain, a big rainbow came out.", "{H} saw a rainbow over {the_place}."),
    "cloud": ("{H} saw a cloud that looked like {acreature_any}.", "A big white cloud floated by."),
    "sky": ("The sky was blue and clear.", "{H} looked up at the big blue sky."),
    "sunset": ("They watched the sunset together.", "The sunset made the sky orange and pink."),
    "sunrise": ("{H} woke up early to see the sunrise.", "The sunrise made the sky pink and gold."),
    "comet": ("That night, a comet flew across the sky.", "{H} saw a bright comet in the sky."),
    "planet": ("{H} wanted to fly to a planet one day.", "{H} liked to look at the planets at night."),
}
_WEATHER = {
    "rain": ("Soon, the rain began to fall.", "{H} liked the sound of the rain."),
    "snow": ("Soft snow covered the ground.", "Outside, the snow was falling."),
    "wind": ("The wind blew the leaves around.", "A cold wind began to blow."),
    "storm": ("A big storm was coming.", "That night, there was a loud storm."),
    "thunder": ("They heard thunder far away.", "Boom! The thunder was loud."),
    "lightning": ("Lightning flashed in the sky.", "Far away, there was a flash of lightning."),
    "fog": ("There was fog everywhere that morning.", "The fog was thick and gray."),
    "sunshine": ("The sunshine felt warm on {his} face.", "The sunshine made everything bright."),
    "breeze": ("A soft breeze blew through {the_place}.", "The breeze was cool and nice."),
    "hail": ("Little balls of hail fell from the sky.", "Then hail began to fall, tap, tap, tap."),
    "snowstorm": ("That night, a big snowstorm came.", "There was a snowstorm, so everyone stayed inside."),
}
_STORM_WEATHER = {"rain", "wind", "storm", "thunder", "lightning", "hail", "snowstorm", "snow"}
_SCENE_NATURE = {   # nature words that are part of the scenery, not a thing to carry around
    "grass": "The grass was soft and green.", "sand": "The sand was warm under {his} feet.",
    "mud": "There was mud everywhere, and {H} got a little dirty.", "dirt": "{H} dug a little hole in the dirt.",
    "ice": "The pond was covered with ice.", "snowman": "{H} and {F} built a big snowman.",
    "snowflake": "A snowflake landed on {H}'s nose.", "icicle": "Long icicles hung from the roof.",
    "snowball": "{H} and {F} threw snowballs at each other.", "log": "They sat on an old log to rest.",
    "vine": "Green vines grew all over the old wall.", "root": "{H} almost tripped on a big tree root.",
    "weed": "{M} pulled the weeds in the garden.", "branch": "A little bird sat on a branch above them.",
    "plant": "{H} gave the plant by the window some water.", "nest": "{H} saw a bird's nest high in a tree.",
    "puddle": "There were big puddles everywhere, and {H} jumped in one.", "moss": "Soft green moss grew on the rocks.",
    "hay": "They sat on a pile of hay to rest.", "wave": "A big wave splashed on the sand.",
}
_BODY = {
    "tooth": "{H} had a loose tooth that wiggled when {he} talked.", "eye": "{H} closed {his} eyes and made a wish.",
    "mouth": "{H} opened {his} mouth wide in surprise.", "tongue": "{H} stuck out {his} tongue at {F} and laughed.",
    "lip": "{H}'s lip began to shake.", "tummy": "{H}'s tummy began to rumble.", "belly": "{H}'s belly began to rumble.",
    "face": "{H} had a big smile on {his} face.", "ear": "{H} put {his} ear to the ground and listened.",
    "hair": "The wind blew {H}'s hair all around.",
}
_BODY_GENERIC = ("{H} fell down and hurt {his} {body}.", "A little ladybug landed on {H}'s {body}.",
                 "{H} bumped {his} {body} and said ouch.")
_TIME_WORDS = {  # time noun -> (paragraph, line)
    "morning": (1, "One morning,"), "afternoon": (1, "One afternoon,"), "evening": (1, "One evening,"),
    "night": (1, "One night,"), "day": (1, "One day,"), "weekend": (1, "One weekend,"),
    "summer": (1, "One summer day,"), "winter": (1, "One winter day,"), "spring": (1, "One day in the spring,"),
    "autumn": (1, "One day in the autumn,"), "week": (4, "A week later, {H} still talked about that day."),
    "bedtime": (4, "At bedtime, {H} told {M} all about {his} day."), "year": (4, "{H} remembered that day for a whole year."),
    "month": (4, "A month later, {H} and {F} went back {to_place}."), "minute": (3, "After a minute, {H} felt better."),
    "hour": (3, "They waited for an hour."),
}
_EVENT = {
    "trip": "{H} and {F} went on a trip {to_place}.", "sleepover": "{F} came over for a sleepover.",
    "vacation": "{H}'s family went on vacation {to_place}.", "birthday": "It was {H}'s birthday.",
    "holiday": "It was a holiday, so there was no school.", "race": "There was going to be a big race {at_place}.",
}
_IDEA = {"idea": "Then {H} had an idea.", "hug": "{H} gave {F} a big hug.", "smile": "{H} gave {F} a big smile.",
         "question": "{H} asked {F} a question.", "story": "That night, {M} told {H} a story.",
         "joke": "{F} told {H} a funny joke.", "riddle": "{F} told {H} a riddle.", "dream": "That night, {H} had a "
         "dream about {the_item}.", "nap": "Later, {H} took a nap.", "bath": "That night, {H} took a bath.",
         "walk": "Later, {H} and {F} took a walk.", "look": "{H} took a look around.",
         "lesson": "{H} learned a lesson that day.", "word": "{H} learned a new word that day.",
         "trick": "{H} learned a new trick.", "noise": "Then {H} heard a noise.", "sound": "Then {H} heard a sound.",
         "poem": "Later, {H} wrote a poem about {the_item}.", "secret": "{H} and {F} kept it a secret."}

_MILD_REACT = ("All of a sudden, {H} {Vp}, and everyone laughed.", "{H} {Vp} and giggled.", "Then {H} {Vp}.",
               "{H} {Vp} a little.")

_FUN_VERBS = tuple(v for v in VERBS if v.kind == "fun" and "{o}" not in v.comp)   # hobbies

# --- the cast's pools --------------------------------------------------------------------------------------------

_SPOTS = [f for f in by_cat("furniture") if f.word in _SAFE_SPOTS]
# Things a child can carry around and play with, by category.
_CARRY = {cat: [x for x in by_cat(cat) if x.word not in _SCENE_NATURE and x.word not in _NOT_CARRIED]
          for cat in _PORTABLE}
# Places a child goes to play on an ordinary day (seed places can be anything).
_NO_OUTING = {"bathroom", "hallway", "house", "desert", "jungle", "swamp", "hospital", "airport", "station",
              "bus stop", "post office", "fire station", "restaurant", "road", "street", "city", "town", "igloo"}
_OUTING_PLACES = {sub: [x for x in by_cat("place", sub) if x.word not in _NO_OUTING]
                  for sub in ("out", "water", "town", "in")}
_YUCK = {"rotten", "stale", "bitter", "yucky", "stinky", "smelly"}
_SNACK_YUCK = ("{F} found {snack} in {fhis} bag. Yuck!", "They found {snack} on the ground, and {H} said, \"Yuck!\"",
               "{M} had packed {snack} by mistake. Nobody wanted to eat it.")
_SEE_CREATURE = ("{at_place}, they saw {the_creature}.", "Then {the_creature} came by.", "{H} saw {the_creature} {at_place}.",
                 "{the_creature} was {at_place} too.")
_MEET_HELPER = ("{at_place}, they met {P}.", "On the way, they said hello to {P}.", "{P} waved at them and smiled.")
_SNACK = {1: ("{M} packed {snack} for them.", "{F} brought {snack} to share.", "They sat down and ate {snack}."),
          4: ("{M} gave them {snack}.", "Later, they had {snack} together.", "{H} and {F} shared {snack}.",
              "When they got home, {M} made them {snack}.")}

_HERO_ANIMALS = ("dog", "puppy", "cat", "kitten", "bunny", "rabbit", "bear", "cub", "fox", "squirrel", "mouse",
                 "duck", "duckling", "pig", "lamb", "pony", "frog", "owl", "bird", "hedgehog", "raccoon", "deer",
                 "turtle", "chick", "elephant", "monkey", "lion", "panda", "penguin", "goat")
_FRIEND_ANIMALS = ("dog", "puppy", "cat", "kitten", "bunny", "hamster", "pony", "duck", "bear", "fox", "squirrel",
                   "mouse", "frog", "owl", "bird", "pig", "lamb", "goat", "horse", "chicken", "turtle", "hedgehog")
_SENTENCE_START = re.compile("([.!?] )([a-z\x01\x03])")


@cache
def _word_re(w: str) -> re.Pattern[str]:
    return re.compile(r"\b" + re.escape(w.lower()) + r"\b")


def _has(low: str, words: tuple[str, ...]) -> bool:
    """Whether any of the words occurs as a whole word in the (lower-cased) text."""
    return any(_word_re(w).search(low) for w in words)


class _Writer:
    """Writes one story. All randomness comes from one `random.Random(seed)` used in a fixed order."""

    def __init__(self, s: StorySeed) -> None:
        self.rng = random.Random(s.seed)
        self.feat = set(s.features)
        self.verb: Verb = VERB[s.verb]
        self.noun: Noun = NOUN[s.noun]
        self.adj = ADJECTIVE[s.adjective]
        self.nkind = _noun_kind(self.noun)
        self.arole = _ADJ_ROLE_WORD.get(self.adj.word) or _ADJ_ROLE[self.adj.cat]
        self.pars: list[list[str]] = [[], [], [], [], []]
        self.c: dict[str, str] = {"A": self.adj.word, "AA": _a(self.adj.word)}
        self.intro: dict[str, tuple[str, str]] = {}   # marker -> (first mention, later mentions)
        self.adj_on = self.arole                       # what the seed adjective describes (set by casting)
        self.yuck = False                              # the snack is rotten or stale: nobody wants it
        self.extra: list[tuple[int, str]] = []         # optional sentences, by paragraph
        self._cast(self.rng)

    # -- casting ------------------------------------------------------------------------------------------------

    def _cast(self, rng: random.Random) -> None:
        c, n, nk = self.c, self.noun, self.nkind
        self._cast_hero(rng)
        self._cast_family(rng)
        self._cast_helper(rng)

        # The place: the seed's; a room for a furniture seed; else where the creature or animal hero lives.
        hero = self.hero
        if nk == "place":
            place = n
        elif nk == "spot":
            place = rng.choice(_OUTING_PLACES["in"])
        elif nk == "event":   # parties and parades happen outside or in town
            place = rng.choice(_OUTING_PLACES[rng.choice(("out", "town"))])
        elif nk == "creature" and hero.noun != n.word:
            place = NOUN[rng.choice(_HABITAT[n.sub])]
        elif hero.kind == "animal":
            place = NOUN[rng.choice(_HABITAT[NOUN[hero.noun].sub])]
        else:
            place = rng.choice(_OUTING_PLACES[rng.choice(("out", "out", "water", "town", "in"))])
        self.place = place
        prep = place.extra or "at"
        c["the_place"] = "the " + place.word
        c["at_place"] = f"{prep} the {place.word}"
        c["to_place"] = ("into the " if place.sub == "in" and prep == "in" else "to the ") + place.word
        if place.word == "tree":
            c["to_place"] = "to the big tree"

        # The creature met there: the seed animal, else one that lives in such a place. Written as a marker, so
        # its first mention in the story reads "a shy fox" and the later ones "the fox" (see _resolve).
        if nk == "creature" and hero.noun != n.word:
            animal = n
        else:
            subs = _PLACE_ANIMALS.get(place.word, ("pet", "garden", "sky"))
            animal = rng.choice(by_cat("animal", rng.choice(subs)))
            if nk == "body" and n.word in ("wing", "paw"):   # the creature will have a hurt wing or paw
                animal = NOUN[rng.choice(sorted(_WINGED if n.word == "wing" else _PAWED))]
            if animal.word == hero.noun:
                animal = NOUN["bird"] if hero.noun != "bird" else NOUN["squirrel"]
        cadj = rng.choice(("little", "small", "big", "funny", "shy", "friendly", "tiny", "young"))

        # The item the plot turns on: the seed's, else one the seed adjective can describe.
        fits = self._fits(self.adj.word)
        if nk == "item":
            item = n
        else:
            cats = [x for x in _PORTABLE if x in fits] if self.arole == "thing" else []
            if hero.kind == "animal" and not cats:
                cats = ["nature", "toy"]
            item = rng.choice(_CARRY[rng.choice(cats or ("toy", "toy", "thing", "clothing", "nature"))])
        self.item = item
        # Where the seed adjective goes (self.adj_on): the item, the creature, the snack, or a line of its own.
        adj = self.adj.word
        iadj = rng.choice(("red", "blue", "yellow", "green", "shiny", "new", "little", "big", "pretty", "pink",
                           "purple", "small", "special", "old", "soft", "orange"))
        if self.arole == "thing" and item.cat in fits:
            iadj, self.adj_on = adj, "item"
        elif self.arole == "thing" and "animal" in fits:
            cadj, self.adj_on = adj, "creature"
        elif self.arole == "thing":
            self.adj_on = "side"      # a thing of its own that the adjective can describe
        elif self.arole == "animal" and self.adj_on != "hero":
            cadj, self.adj_on = adj, "creature"
        self._item_phrases(item, iadj)

        # A snack: the seed's food or drink, or any food; it carries a taste adjective.
        food = n if nk == "snack" else rng.choice(by_cat("food"))
        sadj = rng.choice(("yummy", "sweet", "warm", "little", "big", "fresh", "", "", ""))
        drink = ""
        if self.arole == "food":
            if food.cat == "drink" and adj not in _TASTE_DRINK:   # "a glass of water and some bitter olives"
                drink = f"{rng.choice(('a cup of', 'a glass of'))} {food.word} and "
                food = rng.choice([f for f in by_cat("food") if not f.mass])
            elif adj == "fizzy" and nk != "snack":
                food = rng.choice(by_cat("drink"))
            sadj, self.adj_on = adj, "snack"
            self.yuck = adj in _YUCK
        w = (sadj + " " + food.word).strip()
        if food.cat == "drink":
            c["snack"] = f"{rng.choice(('a cup of', 'a glass of', 'a big cup of'))} {w}"
        elif food.mass or rng.random() < 0.5:
            c["snack"] = drink + "some " + (w if food.mass else (sadj + " " + food.plural).strip())
        else:
            c["snack"] = drink + _a(w)
        c["the_creature"] = _MARK_CREATURE
        self.intro[_MARK_CREATURE] = (_a(f"{cadj} {animal.word}"), "the " + animal.word)
        c["acreature_any"] = _a(rng.choice(("big ", "funny ", "fluffy ", "")) + rng.choice(by_cat("animal")).word)

        # Hiding places fit for the place, a spot at home, a body part, the weather, a noise, the hero's home.
        spots = _SPOTS
        furn = n if nk == "spot" else rng.choice(spots)
        c["spot"] = f"{furn.extra or 'by'} the {furn.word}"
        if place.sub == "in":
            nooks = [c["spot"]] + [f"{f.extra or 'by'} the {f.word}" for f in rng.sample(spots, 3) if f is not furn]
        else:
            nooks = rng.sample(_NOOKS.get(place.sub, _NOOKS["out"]), 3)
        c["nook"], c["nook2"], c["nook3"] = nooks[0], nooks[1], nooks[2]
        c["day"] = self.adj.word if self.arole == "day" else rng.choice(_DAY_ADJ)
        c["aday"] = _a(c["day"])
        c["anoise"] = _a((self.adj.word if self.arole == "noise" else
                          rng.choice(("loud", "strange", "funny", "soft", "rustling", "crunching"))) + " noise")
        if hero.kind == "animal":
            hab = rng.choice(_HABITAT[NOUN[hero.noun].sub])
            c["home"] = f"{NOUN[hab].extra or 'in'} the {hab}"
            c["homeplain"] = "a cozy spot " + c["home"]
        else:
            hadj = rng.choice(("small", "little", "big", "yellow", "blue", "white", "cozy", "old", "red", "green"))
            near = rng.choice(("the woods", "the sea", "a big park", "a busy street", "a quiet lake", "a tall hill",
                               "the river", "a farm", "the school", "a little pond", "the beach", "a big forest"))
            c["homeplain"] = f"{_a(hadj)} house near {near}"
            c["home"] = "in " + c["homeplain"]
        c["atown"] = _a(rng.choice(("little", "small", "quiet", "busy", "sunny", "big", "pretty")) + " " +
                        rng.choice(("town", "village", "city")))
        h, f, m, p = self.hero, self.friend, self.parent, self.helper
        c.update(H=h.name, he=h.he, him=h.him, his=h.his, self=h.self, F=f.name, fhe=f.he, fhim=f.him, fhis=f.his,
                 M=m.name, mhe=m.he, mhim=m.him, mhis=m.his, phe=p.he, phim=p.him, phis=p.his)
        c["his_item"], c["his_ditem"] = h.his + " " + c["item"], h.his + " " + c["the_ditem"][4:]

    def _cast_hero(self, rng: random.Random) -> None:
        """A child most of the time, else an animal or a storybook person (the seed noun when it can be one)."""
        n, nk = self.noun, self.nkind
        if nk == "person" and n.word in _HERO_PERSONS and rng.random() < 0.7:
            male = n.sub == "m" or (n.sub == "n" and rng.random() < 0.5)
            hero = _Char(rng.choice(BOY_NAMES if male else GIRL_NAMES), male, "kid", n.word)
        elif (nk == "creature" and rng.random() < 0.35) or (nk != "creature" and rng.random() < 0.15):
            word = n.word if nk == "creature" else rng.choice(_HERO_ANIMALS)
            male = rng.random() < 0.5
            name = rng.choice(PET_NAMES) if rng.random() < 0.5 else rng.choice(BOY_NAMES if male else GIRL_NAMES)
            hero = _Char(name, male, "animal", word)
        else:
            male = rng.random() < 0.5
            hero = _Char(rng.choice(BOY_NAMES if male else GIRL_NAMES), male, "kid", "boy" if male else "girl")
        self.hero = hero
        # The opening line describes the hero, with the seed adjective when it is a trait, a speed or "wild".
        pre = rng.choice(("little", "happy little", "small", "young", "sweet little", "curious little", "little",
                          "cheerful little", "playful little", "kind little", "", "good little"))
        if self.arole in ("trait", "speed") or (self.arole == "animal" and hero.kind == "animal"):
            self.adj_on = "hero"
            pre = self.adj.word + ("" if self.adj.cat == "size" or self.adj.word == "young" else
                                   rng.choice((" little", " young", "", "")))
        self.c["ahero"] = _a(f"{pre} {hero.noun}".strip())

    def _cast_family(self, rng: random.Random) -> None:
        """The friend (a child, a sibling, a pet, or the seed's family member) and a parent."""
        c, n, hero = self.c, self.noun, self.hero
        parent_male = rng.random() < 0.35
        r = rng.random()
        if self.nkind == "family":
            fam = n.word
            fmale = n.sub == "m" or (n.sub == "n" and rng.random() < 0.5)
            if fam in ("sister", "brother", "cousin", "aunt", "uncle"):
                name = rng.choice(BOY_NAMES if fmale else GIRL_NAMES)
                friend, ftype = _Char(f"{fam.title()} {name}" if fam in ("aunt", "uncle") else name, fmale,
                                      "family", fam), "sibling"
                c["fdesc"] = _a(rng.choice(("big ", "little ", "")) + fam) if fam in ("sister", "brother") else _a(fam)
            else:
                friend, ftype = _Char(fam.title(), fmale, "family", fam), "family"
                if fam in ("mom", "mommy", "dad", "daddy"):
                    parent_male = not fmale
        elif hero.kind == "animal" or r < 0.22:
            word = rng.choice(_FRIEND_ANIMALS)
            fmale = rng.random() < 0.5
            friend, ftype = _Char(rng.choice(PET_NAMES), fmale, "animal", word), "animal"
            c["fdesc"] = ("another " + word if word == hero.noun else
                          _a(rng.choice(("little ", "small ", "friendly ", "funny ", "")) + word))
        elif r < 0.42:
            fmale = rng.random() < 0.5
            fam = "brother" if fmale else "sister"
            friend, ftype = _Char(rng.choice(BOY_NAMES if fmale else GIRL_NAMES), fmale, "family", fam), "sibling"
            c["fdesc"] = _a(rng.choice(("big ", "little ", "baby ", "")) + fam)
        else:
            fmale = rng.random() < 0.5
            friend = _Char(rng.choice(BOY_NAMES if fmale else GIRL_NAMES), fmale, "kid", "boy" if fmale else "girl")
            ftype = "kid"
            c["fdesc"] = _a(rng.choice(("", "funny ", "kind ", "little ", "")) + friend.noun)
        while friend.name == hero.name:
            friend.name = rng.choice(PET_NAMES if friend.kind == "animal" else GIRL_NAMES + BOY_NAMES)
        self.friend, self.ftype = friend, ftype
        c["fnoun"] = friend.noun
        self.parent = _Char("Dad" if parent_male else "Mom", parent_male, "family", "dad" if parent_male else "mom")

    def _cast_helper(self, rng: random.Random) -> None:
        """Someone who can help: the seed's person, a parent, a grown-up, or a wise animal."""
        n = self.noun
        if self.nkind == "person" and self.hero.noun != n.word:
            male = n.sub == "m" or (n.sub == "n" and rng.random() < 0.5)
            helper = _Char("the " + n.word, male, "adult", n.word)
            kid = n.word in ("baby", "kid", "child", "boy", "girl", "elf", "fairy")
            adj = rng.choice(("little", "small", "happy", "cute") if kid else _ADULT_ADJ)
            intro = _a(f"{adj} {n.word}")
        elif rng.random() < 0.3 and self.ftype != "family":
            helper = self.parent
            intro = helper.name
        else:
            word = rng.choice(_HELPER_ANIMALS if self.hero.kind == "animal" else _HELPER_PEOPLE)
            male = word in ("man", "mailman", "fisherman") or (word not in ("woman", "lady") and rng.random() < 0.5)
            helper = _Char("the " + word, male, "adult", word)
            intro = _a(f"{rng.choice(_ADULT_ADJ)} {word}")
        if helper is not self.parent:
            self.intro[_MARK_HELPER] = (intro, helper.name)
            helper.name = _MARK_HELPER
        self.helper = helper
        self.c["P"] = helper.name

    def _fits(self, adj: str) -> set[str]:
        """Noun categories an object adjective can describe."""
        return _FITS_WORD.get(adj) or _FITS_CAT.get(self.adj.cat, set())

    def _item_phrases(self, item: Noun, adj: str) -> None:
        c, w = self.c, item.word
        self.igroup = "ride" if item.cat == "vehicle" else item.cat
        if item.mass:   # "a jar of honey": mass nouns come in something; a taste goes on the food itself
            box = _CONTAINERS.get(w, "bowl" if item.cat == "food" else "box")
            bare = f"{box} of {w}"
            desc = f"{box} of {adj} {w}" if self.adj.cat in ("taste", "temp") and adj == self.adj.word else f"{adj} {bare}"
        else:
            bare, desc = w, f"{adj} {w}"
        c["item"], c["aitem"] = bare, _a(desc)
        c["the_item"], c["the_ditem"] = "the " + bare, "the " + desc
        c["broke"], c["broke_pp"], c["broken"] = (("tore", "torn", "torn") if item.cat == "clothing" or w in _TEARS
                                                  else ("broke", "broken", "broken"))

    def _resolve(self, text: str) -> str:
        """Replace the markers: the first mention introduces ("a shy fox"), the later ones refer ("the fox")."""
        for m, (first, later) in self.intro.items():
            mc = _UPPER[m]
            i, j = text.find(m), text.find(mc)
            if i < 0 and j < 0:
                continue
            if j >= 0 and (i < 0 or j < i):
                text = text[:j] + _cap(first) + text[j + 1:]
            else:
                text = text[:i] + first + text[i + 1:]
            text = text.replace(m, later).replace(mc, _cap(later))
        return text

    # -- filling templates --------------------------------------------------------------------------------------

    def fill(self, t: str) -> str:
        return t.format_map(self.c)

    def line(self, bank: tuple[str, ...]) -> str:
        """A narration sentence (or two) from a bank, filled in, with every sentence start capitalised."""
        out = _cap(self.fill(self.rng.choice(bank)))
        if ". " in out or "! " in out:
            return _SENTENCE_START.sub(lambda m: m.group(1) + _UPPER.get(m.group(2), m.group(2).upper()), out)
        return out

    def optional(self, p: int, sentence: str) -> None:
        """Add a sentence the story can do without (dropped first if the story runs long)."""
        self.pars[p].append(sentence)
        self.extra.append((p, sentence))

    def new_line(self, bank: tuple[str, ...], p: int) -> str:
        """Like line(), but avoids repeating a sentence already in paragraph p."""
        for _ in range(4):
            out = self.line(bank)
            if out not in self.pars[p]:
                break
        return out

    def quote(self, who: str, text: str) -> str:
        """One quoted line with a varied attribution: '"Look!" shouted Lily.' / 'Lily asked, "Where is it?"'."""
        ch = {"H": self.hero, "F": self.friend, "M": self.parent, "P": self.helper}[who]
        text = _cap(self.fill(text))
        rng = self.rng
        verb = "asked" if text[-1] == "?" else rng.choice(_SAY_BANG if text[-1] == "!" else _SAY_PLAIN)
        body = text[:-1] + "," if text[-1] == "." else text
        r = rng.random()
        if r < 0.3:
            return f'"{body}" {verb} {ch.name}.'          # "Look!" said Lily.
        # "she said" only when no other main character (or the parent) is a "she" too.
        others = (self.hero, self.friend, self.parent)
        if r < 0.55 or (r < 0.75 and any(o.male == ch.male for o in others if o is not ch)):
            return _cap(f'{ch.name} {verb}, "{text}"')     # Lily said, "Look!"
        if r < 0.75:
            return f'"{body}" {ch.he} {verb}.'            # "Look!" she said.
        return f'"{body}" {ch.name} {verb}.'               # "Look!" Lily said.

    def exchange(self, p: int, convs: tuple[tuple[tuple[str, str], ...], ...]) -> None:
        """Add one short conversation."""
        self.pars[p].extend(self.quote(w, t) for w, t in self.rng.choice(convs))

    def verb_phrase(self, v: Verb, who: _Char | None, form: str) -> str:
        """'jumped over the puddles', 'share her toys' ... with the story's item as the object when it fits."""
        word = v.ing if form == "ing" else v.past if form == "past" else v.base
        comp = v.comp
        if "{o}" in comp:
            comp = comp.replace("{o}", self.c["the_item"] if self.item.cat in v.objects else v.default_obj)
        return f"{word} {comp.replace('{his}', who.his if who else 'their')}".strip()

    # -- the story ----------------------------------------------------------------------------------------------

    def write(self) -> str:
        rng, c, feat, P = self.rng, self.c, self.feat, self.pars
        plot = _PLOTS[self._choose_plot(rng)]
        dialogue = "dialogue" in feat
        hint = rng.choice(plot["hints"]) if "foreshadowing" in feat else None

        # 1. Setup: who the hero is, what they love, who their friend is, the item.
        opening = rng.choice(_OPENINGS)
        P[0].append(self.line((opening,)))
        if "{home}" not in opening and rng.random() < 0.4:
            self.optional(0, self.line(_HOME_LINES))
        # The hobby line uses the seed verb when it is a fun one ("Lily loved to jump over the puddles").
        hobby = self.verb if self.verb.kind == "fun" and rng.random() < 0.6 else rng.choice(_FUN_VERBS)
        if hobby is self.verb or rng.random() < 0.8:
            c["V"] = self.verb_phrase(hobby, self.hero, "base")
            self.optional(0, self.line(_HOBBY))
        P[0].append(self.line(_FRIEND_INTRO[self.ftype]))
        owned = plot is not _SHARE or rng.random() < 0.5   # in a sharing story the item may be found instead
        if owned:
            P[0].append(self.line(_ITEM_INTRO[self.igroup]))
        if hint and rng.random() < 0.5:
            P[0].append(self.line(hint[:1]))
            hint = ("", hint[1])

        # 2. The day: when, where, and what the hero wants to do.
        if plot.get("pre"):
            P[1].append(self.line(plot["goal"]))
        time_line = rng.choice(_TIME)
        if self.nkind == "time" and _TIME_WORDS[self.noun.word][0] == 1:
            time_line = _TIME_WORDS[self.noun.word][1]
            if self.arole == "day":
                time_line = time_line.replace("One ", "One {day} ", 1)
        elif self.arole == "day" and "{day}" not in time_line:
            time_line = "One {day} day,"
        go = rng.choice(_GO)
        P[1].append(self.line((time_line + " " + (go[0].lower() + go[1:] if go[0] != "{" else go),)))
        if P[0][-1].find(c["item"]) >= 0 and rng.random() < 0.6:
            P[1][-1] += self.fill(rng.choice(_BRING))
        if dialogue and rng.random() < 0.5:
            self.exchange(1, _GO_LINES)
            self.extra.extend((1, q) for q in P[1][-2:])
        self.optional(1, self.line(_ARRIVE + _ARRIVE_OUT if self.place.sub in ("out", "water") else _ARRIVE))
        if not plot.get("pre"):
            P[1].append(self.line(plot["goal"] if owned else plot["goal_new"]))
        if hint and hint[0]:
            P[1].append(self.line(hint[:1]))

        # 3. The problem.
        if self.verb.kind == "oops":
            P[2].append(self._verb_line(2))
            P[2].append(self.line(plot["trigger_oops"]))
        else:
            P[2].append(self.line(plot["trigger"]))
        if hint:
            P[2].append(self.line(hint[1:]))
        P[2].append(self.line(plot["sad"]))
        if dialogue:
            self.exchange(2, plot["lines"])
        self.optional(2, self.line(plot["search"]))
        if "conflict" in feat:
            P[2].append(self.line(_CONFLICT))
            if dialogue:
                self.exchange(2, _CONFLICT_LINES)

        # 4. How it turns out, and 5. how it ends.
        bad = "bad ending" in feat
        twist = "plot twist" in feat
        if twist:
            P[3].append(self.line(plot["twist_bad" if bad else "twist"]))
            if dialogue:
                self.exchange(3, _TWIST_LINES_BAD if bad else _TWIST_LINES)
        if bad:
            if not twist:
                P[3].append(self.line(plot["bad"]))
            if "conflict" in feat:
                P[3].append(self.line(("{H} and {F} did not talk to each other for a long time.",
                                       "{F} went home angry, and {H} was left all alone.")))
            P[4].append(self.line(_SAD_END))
        else:
            if not twist:
                P[3].append(self.line(plot["solve"]))
                if dialogue:   # the helper only speaks if the solution brought them in
                    helped = _MARK_HELPER in P[3][-1] or _UPPER[_MARK_HELPER] in P[3][-1]
                    convs = [cv for cv in plot["lines_solve"] if any(w == "P" for w, _ in cv) == helped]
                    self.exchange(3, tuple(convs) or plot["lines_solve"])
            if "conflict" in feat:
                P[3].append(self.line(_MAKE_UP))
                if dialogue and rng.random() < 0.5:
                    self.exchange(3, _MAKE_UP_LINES)
            P[4].append(self.line(plot["end"]))
            P[4].append(self.new_line(_HAPPY_END, 4))
        if "moral value" in feat:
            if self.verb.kind == "bad" and rng.random() < 0.6:
                c["L"] = "it is not nice to " + self.verb_phrase(self.verb, None, "base")
            else:
                c["L"] = rng.choice(_LESSONS[rng.choice(plot["lessons"])])
            P[4].append(self.line(_MORAL_FRAMES_SAD if bad else _MORAL_FRAMES))

        self._seed_words()
        # Keep lengths in the 120-300 word range: drop optional lines from long stories, add to short ones.
        n_words = sum(len(x.split()) for p in P for x in p)
        for p, sent in reversed(self.extra):
            if n_words <= 280:
                break
            P[p].remove(sent)
            n_words -= len(sent.split())
        if n_words < 130:
            self._insert(1, self.line(_FILLER))
            self._insert(4, self.new_line(_SAD_END if bad else _HAPPY_END, 4))
        return self._layout()

    def _choose_plot(self, rng: random.Random) -> str:
        options = _PLOTS_FOR_ITEM[self.igroup]
        if self.place.sub == "in":   # no trees to get stuck in, no rain indoors
            options = tuple(p for p in options if p not in ("stuck", "storm"))
        if self.nkind == "weather" and self.noun.word in _STORM_WEATHER and self.place.sub != "in" \
                and rng.random() < 0.7:
            return "storm"
        if self.arole == "noise" and rng.random() < 0.6:
            return "scared"
        if self.verb.kind == "oops":   # an accident starts the trouble; losing something starts a search
            fit = ("lost",) if self.verb.base in ("lose", "forget", "leave", "miss") else ("lost", "broken", "stuck",
                                                                                           "disobey")
            options = tuple(p for p in options if p in fit) or ("lost",)
        return rng.choice(options)

    # -- seed words ---------------------------------------------------------------------------------------------

    def _verb_line(self, p: int) -> str:
        """A sentence that uses the seed verb, in a form fit for paragraph p."""
        v, c = self.verb, self.c
        c["Vb"] = self.verb_phrase(v, self.hero, "base")
        c["Vp"] = self.verb_phrase(v, self.hero, "past")
        c["Vi"] = self.verb_phrase(v, self.hero, "ing")
        c["Vp_they"] = self.verb_phrase(v, None, "past")
        c["Vi_they"] = self.verb_phrase(v, None, "ing")
        c["Vb_f"] = self.verb_phrase(v, self.friend, "base")
        if v.kind == "react" and v.base not in _SAD_REACT:
            return self.line(_MILD_REACT)
        for q, bank in _VERB_LINES[v.kind]:
            if q == p:
                return self.line(bank)
        return self.line(_VERB_LINES[v.kind][0][1])

    def _seed_words(self) -> None:
        """Make sure the seed verb, noun and adjective are used, each in a paragraph where it fits."""
        rng, c = self.rng, self.c
        v, n, k, w = self.verb, self.noun, self.nkind, self.noun.word
        if not _has(self._text(), (v.base, v.past, v.ing)):
            places = [q for q, _ in _VERB_LINES[v.kind]]
            if v.kind == "fun":   # the hobby line already said what the hero loves; now they do it
                places = [1]
            elif v.kind == "still":
                places = [4] if v.base in _STILL_END else [1] if v.base in _STILL_START else places
            elif v.kind == "react" and v.base not in _SAD_REACT:
                places = [1, 4]
            p = rng.choice(places)
            self._insert(p, self._verb_line(p))

        if not _has(self._text(), (w, n.plural)):
            if k == "creature":
                self._insert(1, self.line(_SEE_CREATURE))
            elif k == "person":
                self._insert(1, self.line(_MEET_HELPER))
            elif k == "snack":
                p = 1 if "bad ending" in self.feat else rng.choice((1, 4))
                self._insert(p, self.line(_SNACK_YUCK if self.yuck else _SNACK[p]))
            elif k == "vehicle":
                move = ("flew over" if w in ("plane", "rocket", "helicopter", "spaceship") else "sailed by"
                        if w in ("boat", "ship", "submarine", "sailboat", "canoe", "raft") else "drove by")
                c["veh"] = _a(rng.choice(("big", "fast", "loud", "shiny", "little")) + " " + w)
                self._insert(1, self.line((f"On the way, {{veh}} {move}, and {{H}} waved at it.",
                                           "{H} and {F} saw {veh} go by and waved.")))
            elif k == "spot":
                self.pars[0].append(self.line(("{H} kept {his_item} {spot}.", "Every night, {H} put {the_item} {spot}.")))
            elif k == "place":
                self._insert(1, self.line(("They went {to_place}.",)))
            elif k == "family":
                self._insert(0, self.line(("{H} lived with {his} {fnoun}.",)))
            elif k == "sky":   # night-sky lines go at the end of the day
                self._insert(4 if w in ("moon", "star", "comet", "planet", "sunset") else 1, self.line(_SKY[w]))
            elif k == "weather":
                self._insert(1, self.line(_WEATHER[w]))
            elif k == "scene":
                self._insert(1, self.line((_SCENE_NATURE[w],)))
            elif k == "body":
                if w in _BODY:
                    self._insert(rng.choice((1, 2)), self.line((_BODY[w],)))
                elif w in ("wing", "tail", "paw"):
                    who = "{H}" if self.hero.kind == "animal" else "{the_creature}"
                    self._insert(2, self.line((f"{who} had a hurt {w}.",)))
                else:
                    c["body"] = w
                    self._insert(2, self.line(_BODY_GENERIC))
            elif k == "time":
                p, t = _TIME_WORDS[w]
                self._insert(p, self.line((t,)))
            elif k == "event":
                self._insert(1, self.line((_EVENT.get(w, f"There was going to be {_a(w)} {{at_place}}."),)))
            elif k == "idea":
                if w in _IDEA:
                    self._insert(4, self.line((_IDEA[w],)))
                else:
                    past = n.extra.split(":")[1]
                    self._insert(4, self.line((f"Then {{H}} and {{F}} {past} {w if n.mass else _a(w)} together.",)))
            else:
                self._insert(1, self.line((f"{{H}} saw {_a(w)}.",)))

        a, on = self.adj.word, self.adj_on
        if not _has(self._text(), (a,)):
            if on == "creature":
                self._insert(1, self.line(_SEE_CREATURE))
            elif on == "snack":
                p = 1 if "bad ending" in self.feat else rng.choice((1, 4))
                self._insert(p, self.line(_SNACK_YUCK if self.yuck else _SNACK[p]))
            elif on == "item":
                self._insert(0, self.line(("{H} had {aitem}.",)))
            elif on in ("hero", "trait"):
                self._insert(0, self.line(("{F} was very {A}.", "{H} was always {A}.", "Everyone said {H} was {A}.")))
            elif on == "feel_good" and "bad ending" in self.feat:   # happy before things went wrong
                self._insert(1, self.line(("{H} felt {A} that morning.", "{H} was so {A} to go {to_place}.")))
            elif on in _ADJ_LINES:
                p, bank = rng.choice(_ADJ_LINES[on])
                self._insert(p, self.line(bank))
            else:
                # A thing of its own that the adjective describes: "a prickly pinecone", "a round stone".
                fits = self._fits(a) - {"animal", "vehicle", "food"}
                thing = rng.choice(_SIDE_THINGS.get(a) or
                                   [x.word for x in by_cat(rng.choice(sorted(fits) or ["thing"])) if not x.mass])
                c["AT"] = _a(f"{a} {thing}")
                self._insert(1, self.line(("{at_place}, {H} found {AT}.", "On the way, {H} saw {AT}.",
                                           "{F} showed {H} {AT}.")))

    def _text(self) -> str:
        """The story so far, lower-cased, with first mentions resolved (for checking which seed words are in)."""
        return self._resolve(" ".join(" ".join(p) for p in self.pars)).lower()

    def _insert(self, p: int, sentence: str) -> None:
        """Insert a sentence inside paragraph p (after its first sentence, so openings stay openings)."""
        par = self.pars[p]
        # Never between two quoted lines: that would cut a conversation in half.
        slots = [i for i in range(1, len(par) + 1) if i == len(par) or '"' not in par[i - 1] or '"' not in par[i]]
        par.insert(self.rng.choice(slots) if par else 0, sentence)

    def _layout(self) -> str:
        """Join sentences into paragraphs; merge some neighbours so stories have 3 to 5 paragraphs."""
        pars = [self._resolve(" ".join(p)) for p in self.pars if p]
        r = self.rng.random()
        if r < 0.45 and len(pars) >= 4:
            pars[0:2] = [pars[0] + " " + pars[1]]
        if (r < 0.2 or 0.45 <= r < 0.65) and len(pars) >= 4:
            pars[-2:] = [pars[-2] + " " + pars[-1]]
        return "\n\n".join(pars)
