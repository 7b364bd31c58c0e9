"""What the memory dialogues say, per language: fact phrasings, acknowledgements, questions, small talk.

One `Language` holds every line a dialogue can contain; `cellstream.model.corpus` decides their order. Names and
cities are shared between languages; jobs are words of each language (French ones with accents).
Small talk comes from word pools and sentence shapes, split into a training and a held-out half.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = (
    "alice bob carla david emma felix grace hugo irene jack karen leo maria nina oscar paula quentin "
    "rosa samuel tina ugo vera walter xavier yasmin zoe adam bella chris diana ethan fiona george "
    "helen ivan julia kevin laura martin nora owen petra ralph sofia thomas ursula victor wendy "
    "yann zack anna boris clara denis elsa"
).split()
CITIES = (
    "paris london berlin madrid rome lisbon vienna prague dublin oslo "
    "stockholm helsinki warsaw athens brussels amsterdam zurich geneva lyon marseille "
    "toulouse nantes bordeaux lille montreal toronto boston chicago denver seattle "
    "tokyo osaka seoul sydney"
).split()
JOBS = (
    "baker teacher nurse doctor pilot farmer lawyer painter plumber carpenter "
    "writer singer dentist chef banker tailor gardener librarian mechanic "
    "programmer sailor journalist"
).split()
JOBS_FR = (
    "boulanger infirmière médecin aviateur agricultrice avocat peintre plombier menuisier écrivain "
    "chanteuse dentiste cuisinier banquière tailleur jardinier bibliothécaire mécanicien programmeuse "
    "journaliste pâtissier coiffeuse vétérinaire pharmacien fleuriste"
).split()

KINDS = ("name", "city", "job")


@dataclass(frozen=True)
class SmallTalk:
    """Word pools (by kind: noun, adj, verb, feeling, time) and sentence shapes of one language.

    A shape's `{kind}` is filled from that pool; a bot shape's `{echo}` repeats a noun of the user's line.
    """

    words: dict[str, tuple[str, ...]]
    user_shapes: tuple[str, ...]
    bot_shapes: tuple[str, ...]


@dataclass(frozen=True)
class Language:
    """Every line of a memory dialogue in one language; `{v}` is the fact's value."""

    code: str
    jobs: tuple[str, ...]
    greeting: tuple[str, str]  # (user, bot)
    facts: dict[str, tuple[str, ...]]  # how the user states a fact (repeats weight the canonical one)
    acks: dict[str, tuple[str, ...]]  # how the bot acknowledges it
    updates: dict[str, tuple[str, ...]]  # how the user changes a fact later on
    update_acks: dict[str, tuple[str, ...]]
    # More natural ways to state and change a fact (issue 24), drawn beside the ones above where a dialogue
    # asks for them: in training and in the unseen-values evaluation, not in issue 14's figures.
    fact_variants: dict[str, tuple[str, ...]]
    update_variants: dict[str, tuple[str, ...]]
    questions: dict[str, tuple[str, str]]  # the exact question and its answer
    question_variants: dict[str, tuple[str, ...]]  # training questions
    small_talk: SmallTalk

    def values(self, kind: str) -> tuple[str, ...]:
        return {"name": tuple(NAMES), "city": tuple(CITIES), "job": self.jobs}[kind]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ENGLISH = Language(
    code="en",
    jobs=tuple(JOBS),
    greeting=("hello!", "hello! how can i help?"),
    facts={
        "name": ("my name is {v}.", "my name is {v}.", "i am {v}.", "call me {v}.", "people call me {v}."),
        "city": ("i live in {v}.", "i live in {v}.", "my home is in {v}.", "these days i live in {v}."),
        "job": ("i work as a {v}.", "i work as a {v}.", "my job is {v}.", "i earn my living as a {v}."),
    },
    acks={
        "name": ("nice to meet you, {v}.", "hello {v}!", "got it, {v}.", "pleased to meet you, {v}."),
        "city": ("{v} sounds lovely.", "noted, {v}.", "oh, {v}!", "i see, {v}."),
        "job": ("being a {v} must be interesting.", "noted, a {v}.", "a {v}, nice.", "good to know, a {v}."),
    },
    updates={
        "name": ("actually, my name is {v}.", "actually, my name is {v}.", "please call me {v} from now on."),
        "city": ("i moved to {v}.", "i moved to {v}.", "now i live in {v}.", "i just moved to {v}."),
        "job": ("i work as a {v} now.", "i work as a {v} now.", "i changed jobs, i am a {v} now."),
    },
    update_acks={
        "name": ("sorry, {v} then.", "got it, you are {v}.", "ok, {v} it is."),
        "city": ("so you live in {v} now.", "{v}, what a move!", "noted, {v} now."),
        "job": ("a {v} now, nice.", "noted, a {v} now.", "so you are a {v} now."),
    },
    fact_variants={
        "name": ("i'm {v}.", "my name's {v}.", "hi, my name is {v}."),
        "city": ("i'm based in {v}.", "i live in {v} with my family.", "home for me is {v}."),
        "job": ("i'm a {v}.", "i work as a {v} these days.", "by trade i am a {v}."),
    },
    update_variants={
        "name": ("i changed my name to {v}.", "sorry, my name is {v}, not that."),
        "city": ("i have moved to {v}.", "i live in {v} now."),
        "job": ("i'm a {v} now.", "my new job: {v}."),
    },
    questions={
        "name": ("what is my name?", "your name is {v}."),
        "city": ("where do i live?", "you live in {v}."),
        "job": ("what is my job?", "you work as a {v}."),
    },
    question_variants={
        "name": ("what is my name?", "what is my name?", "do you remember my name?", "who am i?"),
        "city": ("where do i live?", "where do i live?", "which city do i live in?", "where is my home?"),
        "job": ("what is my job?", "what is my job?", "what do i do for a living?", "what is my work?"),
    },
    small_talk=SmallTalk(
        words={
            "noun": _words(
                "book song movie garden kitchen river mountain bicycle window coffee tea bread soup cake "
                "market museum park beach forest lake bridge train bus car boat phone laptop camera guitar "
                "piano painting letter story game puzzle recipe sweater jacket umbrella lamp chair table "
                "dog cat bird horse rabbit fish flower tree cloud storm sunset breakfast dinner lunch "
                "holiday weekend festival concert exhibition newspaper magazine podcast blanket candle "
                "mirror clock pillow basket bottle kettle notebook pencil island valley desert meadow"
            ),
            "adj": _words(
                "quiet noisy sunny rainy cold warm bright dark old new small big strange simple funny "
                "boring lovely busy calm slow quick soft loud fresh tired happy sleepy lucky green blue "
                "red yellow tiny huge gentle wild cozy odd fancy plain shiny dusty muddy crowded empty"
            ),
            "verb": _words(
                "read watched cooked painted cleaned visited fixed bought sold found lost built drew "
                "planted washed carried borrowed baked wrote sang played tried opened closed moved "
                "packed tidied checked ordered shared forgot noticed repaired"
            ),
            "feeling": _words(
                "fun nice odd great fine weird relaxing tiring exciting pleasant dull charming "
                "surprising annoying peaceful"
            ),
            # Time expressions span several words, so they are listed whole rather than split on spaces.
            "time": (
                "yesterday", "today", "this morning", "last night", "on monday", "on friday", "last week",
                "this spring", "at noon", "in the evening", "after work", "before bed", "last summer",
                "every day", "sometimes", "on sunday",
            ),
        },
        user_shapes=(
            "{time} i {verb} a {adj} {noun}.",
            "i {verb} the {noun} {time}.",
            "the {noun} was {adj} {time}.",
            "have you ever {verb} a {noun}?",
            "do you like {noun}s?",
            "my {noun} is {adj}.",
            "i think the {noun} looks {adj}.",
            "what do you think of the {adj} {noun}?",
            "{time} it was {adj} outside.",
            "i saw a {adj} {noun} near the {noun}.",
            "there is a {noun} on the {noun}.",
            "i want a {adj} {noun} for my {noun}.",
            "the weather is {adj} {time}.",
            "my friend {verb} a {noun} {time}.",
            "it was {feeling} to see the {noun}.",
            "tell me something about {noun}s.",
            "i forgot my {noun} at the {noun}.",
            "is a {noun} better than a {noun}?",
            "we {verb} the {adj} {noun} together.",
            "how was your {noun}?",
            "a {adj} {noun} makes me smile.",
            "the {noun} smelled {adj}.",
        ),
        bot_shapes=(
            "that sounds {feeling}.",
            "i like {adj} {noun}s too.",
            "a {noun} can be very {adj}.",
            "tell me more about the {noun}.",
            "how {feeling}!",
            "i have never {verb} a {noun}.",
            "{noun}s are {feeling}.",
            "that must have been {feeling}.",
            "i prefer a {adj} {noun}.",
            "really? a {adj} {noun}?",
            "what a {feeling} {noun}.",
            "maybe you should get a {noun}.",
            "i hope the {noun} was {adj}.",
            "the {noun} sounds {adj}.",
            "interesting, tell me more.",
            "{time} sounds {feeling}.",
            "a {echo}? tell me more.",
            "i love a good {echo}.",
            "oh, the {echo}!",
            "your {echo} sounds {adj}.",
            "what kind of {echo}?",
            "a {adj} {echo}, nice.",
            "i also like the {echo}.",
            "the {echo} again?",
        ),
    ),
)

# French nouns carry their article (gender and elision come with the word); adjectives are the
# kind that do not change with gender, so any shape agrees with any noun.
FRENCH = Language(
    code="fr",
    jobs=tuple(JOBS_FR),
    greeting=("bonjour !", "bonjour ! comment puis-je t'aider ?"),
    facts={
        "name": ("je m'appelle {v}.", "je m'appelle {v}.", "mon prénom est {v}.", "on m'appelle {v}."),
        "city": ("j'habite à {v}.", "j'habite à {v}.", "je vis à {v}.", "ma maison est à {v}."),
        "job": ("je travaille comme {v}.", "je travaille comme {v}.", "mon métier : {v}.",
                "je gagne ma vie comme {v}."),
    },
    acks={
        "name": ("enchanté, {v}.", "bonjour {v} !", "c'est noté, {v}.", "ravi de te connaître, {v}."),
        "city": ("{v}, c'est joli.", "noté, {v}.", "oh, {v} !", "je vois, {v}."),
        "job": ("{v}, c'est un beau métier.", "noté, {v}.", "ah, {v}, très bien.", "bon à savoir : {v}."),
    },
    updates={
        "name": ("en fait, je m'appelle {v}.", "en fait, je m'appelle {v}.", "appelle-moi {v} désormais."),
        "city": ("j'ai déménagé à {v}.", "j'ai déménagé à {v}.", "maintenant j'habite à {v}."),
        "job": ("maintenant je travaille comme {v}.", "maintenant je travaille comme {v}.",
                "j'ai changé de métier, je suis {v}."),
    },
    update_acks={
        "name": ("pardon, {v} alors.", "d'accord, tu es {v}.", "entendu, {v}."),
        "city": ("donc tu habites à {v} maintenant.", "{v}, quel changement !", "noté, {v} maintenant."),
        "job": ("{v} maintenant, très bien.", "noté, {v} maintenant.", "donc tu es {v} maintenant."),
    },
    fact_variants={
        "name": ("moi, c'est {v}.", "mon nom est {v}.", "bonjour, je m'appelle {v}."),
        "city": ("je vis à {v} avec ma famille.", "ma ville, c'est {v}."),
        "job": ("je suis {v} de métier.", "mon travail : {v}."),
    },
    update_variants={
        "name": ("mon nouveau prénom est {v}.",),
        "city": ("je vis à {v} maintenant.", "je viens de déménager à {v}."),
        "job": ("je suis {v} maintenant.",),
    },
    questions={
        "name": ("comment je m'appelle ?", "tu t'appelles {v}."),
        "city": ("où est-ce que j'habite ?", "tu habites à {v}."),
        "job": ("quel est mon métier ?", "tu travailles comme {v}."),
    },
    question_variants={
        "name": ("comment je m'appelle ?", "comment je m'appelle ?", "tu te souviens de mon prénom ?",
                 "qui suis-je ?"),
        "city": ("où est-ce que j'habite ?", "où est-ce que j'habite ?", "dans quelle ville j'habite ?",
                 "où est ma maison ?"),
        "job": ("quel est mon métier ?", "quel est mon métier ?", "qu'est-ce que je fais dans la vie ?",
                "quel est mon travail ?"),
    },
    small_talk=SmallTalk(
        words={
            "noun": (
                "le livre", "la chanson", "le film", "le jardin", "la cuisine", "la rivière", "la montagne",
                "le vélo", "la fenêtre", "le café", "le thé", "le pain", "la soupe", "le gâteau", "le marché",
                "le musée", "le parc", "la plage", "la forêt", "le lac", "le pont", "le train", "le bus",
                "la voiture", "le bateau", "le téléphone", "l'ordinateur", "l'appareil photo", "la guitare",
                "le piano", "le tableau", "la lettre", "l'histoire", "le jeu", "le puzzle", "la recette",
                "le pull", "la veste", "le parapluie", "la lampe", "la chaise", "le chien", "le chat",
                "l'oiseau", "le cheval", "le lapin", "le poisson", "la fleur", "l'arbre", "le nuage",
                "l'orage", "le coucher de soleil", "le petit déjeuner", "le dîner", "le déjeuner",
                "le week-end", "le festival", "le concert", "l'exposition", "le journal", "le magazine",
                "la couverture", "la bougie", "le miroir", "l'horloge", "l'oreiller", "le panier",
                "la bouteille", "la bouilloire", "le cahier", "le crayon", "l'île", "la vallée",
                "le désert", "la prairie",
            ),
            "adj": _words(
                "calme tranquille étrange simple drôle rapide jaune rouge magnifique agréable bizarre "
                "énorme minuscule sympathique moderne célèbre triste propre solide fragile immense superbe "
                "pratique utile rare sombre humide chouette jeune riche pauvre confortable"
            ),
            "verb": _words(
                "lu regardé cuisiné peint nettoyé visité réparé acheté vendu trouvé perdu construit "
                "dessiné lavé porté emprunté écrit chanté essayé ouvert fermé rangé commandé partagé "
                "oublié remarqué préparé décoré"
            ),
            "feeling": _words(
                "amusant sympa génial reposant fatigant passionnant ennuyeux charmant surprenant "
                "énervant paisible étonnant formidable curieux"
            ),
            "time": (
                "hier", "aujourd'hui", "ce matin", "hier soir", "lundi", "vendredi", "la semaine dernière",
                "ce printemps", "à midi", "le soir", "après le travail", "avant de dormir", "l'été dernier",
                "tous les jours", "parfois", "dimanche",
            ),
        },
        user_shapes=(
            "{time} j'ai {verb} {noun}.",
            "j'ai {verb} {noun} {time}.",
            "{noun} était {adj} {time}.",
            "as-tu déjà {verb} {noun} ?",
            "tu aimes {noun} ?",
            "je trouve {noun} {adj}.",
            "à ton avis, {noun} est {adj} ?",
            "{time} le ciel était {adj}.",
            "j'ai vu {noun} près de chez moi.",
            "il y a {noun} dans le salon.",
            "je cherche {noun} pour mon ami.",
            "le temps est {adj} {time}.",
            "mon ami a {verb} {noun} {time}.",
            "c'était {feeling} de voir {noun}.",
            "raconte-moi une histoire sur {noun}.",
            "j'ai oublié {noun} chez moi.",
            "tu préfères {noun} ou {noun} ?",
            "nous avons {verb} {noun} ensemble.",
            "comment était {noun} ?",
            "{noun} me fait sourire.",
            "{noun} sentait bon {time}.",
            "je pense souvent à {noun}.",
        ),
        bot_shapes=(
            "ça a l'air {feeling}.",
            "j'aime aussi {noun}.",
            "{noun} peut être très {adj}.",
            "dis-m'en plus sur {noun}.",
            "comme c'est {feeling} !",
            "je n'ai jamais {verb} {noun}.",
            "c'est {feeling}, {noun}.",
            "ça devait être {feeling}.",
            "je préfère {noun}.",
            "vraiment ? {noun} ?",
            "quel moment {feeling} !",
            "tu devrais essayer {noun}.",
            "j'espère que {noun} était {adj}.",
            "{noun} a l'air {adj}.",
            "intéressant, dis-m'en plus.",
            "{time}, c'est {feeling}.",
            "{echo} ? dis-m'en plus.",
            "j'adore {echo}.",
            "oh, {echo} !",
            "{echo} a l'air {adj}.",
            "et {echo}, c'était comment ?",
            "{echo}, c'est {adj}.",
            "moi aussi j'aime {echo}.",
            "encore {echo} ?",
        ),
    ),
)

LANGUAGES: dict[str, Language] = {ENGLISH.code: ENGLISH, FRENCH.code: FRENCH}
