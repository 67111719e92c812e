"""The offline backend's built-in knowledge: a compact vocabulary keyed on category and title words.

Small on purpose: it exists so the pipeline runs end to end without a GPU and produces plausible,
deterministic rows (clearly labelled offline-heuristic-v1), not to compete with an LLM.
"""

from __future__ import annotations

# Reference price bands (roughly the 33rd and 67th percentiles of typical retail prices) per
# family. Fixed rather than computed from the batch, so an item's tier never depends on which
# Spark partition or run it happened to land in.
PRICE_BANDS: dict[str, tuple[float, float]] = {
    "general": (15, 60),
    "electronics": (50, 300),
    "computing": (200, 900),
    "appliances": (40, 200),
    "tools": (30, 150),
    "furniture": (80, 400),
    "apparel": (20, 70),
    "footwear": (40, 120),
    "jewelry": (40, 250),
    "beauty": (10, 40),
    "grocery": (5, 20),
    "books": (10, 25),
    "toys": (15, 50),
    "sports": (25, 120),
    "home": (15, 60),
    "pets": (10, 40),
    "baby": (15, 80),
    "auto": (20, 100),
    "music": (60, 400),
}

# fmt: off
# (hand-laid tables: one entry per line or two reads better than the formatter's one value per line)

# word -> (family, audiences, scenarios, complements, substitutes, occasions)
_V = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]
VOCAB: dict[str, _V] = {
    # tools
    "drill": ("tools", ("diy enthusiasts", "contractors"), ("home improvement", "furniture assembly"),
              ("drill bits", "safety glasses", "screwdriver bits"), ("impact driver", "screwdriver set"), ()),
    "saw": ("tools", ("woodworkers", "contractors"), ("woodworking", "home renovation"),
            ("saw blades", "safety glasses", "clamps"), ("jigsaw", "hand saw"), ()),
    "hammer": ("tools", ("diy enthusiasts",), ("home repair",), ("nails", "tool box"), ("mallet",), ()),
    "screwdriver": ("tools", ("diy enthusiasts",), ("furniture assembly", "home repair"),
                    ("screws", "bit set"), ("cordless screwdriver",), ()),
    "wrench": ("tools", ("mechanics", "diy enthusiasts"), ("car maintenance", "plumbing repair"),
               ("socket set", "tool box"), ("adjustable pliers",), ()),
    "ladder": ("tools", ("homeowners",), ("home maintenance",), ("tool belt", "work gloves"), ("step stool",), ()),
    # computing and electronics
    "laptop": ("computing", ("students", "remote workers"), ("remote work", "studying"),
               ("laptop bag", "wireless mouse", "usb-c hub"), ("tablet", "desktop computer"), ()),
    "notebook": ("computing", ("students", "remote workers"), ("remote work", "studying"),
                 ("laptop bag", "wireless mouse"), ("tablet",), ()),
    "tablet": ("computing", ("students", "casual users"), ("reading", "streaming video"),
               ("tablet case", "stylus", "screen protector"), ("laptop", "e-reader"), ()),
    "computer": ("computing", ("office workers", "gamers"), ("office work", "gaming"),
                 ("monitor", "keyboard", "mouse"), ("laptop",), ()),
    "monitor": ("electronics", ("remote workers", "gamers"), ("home office", "gaming"),
                ("hdmi cable", "monitor arm"), ("tv",), ()),
    "keyboard": ("electronics", ("office workers", "gamers"), ("typing", "gaming"),
                 ("mouse", "wrist rest"), ("keyboard case",), ()),
    "mouse": ("electronics", ("office workers", "gamers"), ("office work", "gaming"),
              ("mouse pad", "keyboard"), ("trackpad", "trackball"), ()),
    "printer": ("computing", ("home office workers", "small businesses"), ("printing documents",),
                ("ink cartridges", "printer paper"), ("all-in-one printer",), ()),
    "phone": ("electronics", ("mobile users",), ("communication", "mobile photography"),
              ("phone case", "screen protector", "charger"), ("feature phone",), ()),
    "smartphone": ("electronics", ("mobile users",), ("communication", "mobile photography"),
                   ("phone case", "screen protector", "charger"), ("feature phone",), ()),
    "charger": ("electronics", ("mobile users",), ("charging devices",), ("charging cable",), ("power bank",), ()),
    "power bank": ("electronics", ("travelers", "mobile users"), ("travel", "charging on the go"),
                   ("charging cable",), ("wall charger",), ()),
    "battery": ("electronics", (), ("powering devices",), ("battery charger",), ("rechargeable batteries",), ()),
    "headphone": ("electronics", ("commuters", "music lovers"), ("commuting", "listening to music"),
                  ("headphone case", "audio cable"), ("earbuds", "speaker"), ()),
    "earbud": ("electronics", ("commuters", "athletes"), ("commuting", "workouts"),
               ("charging case", "ear tips"), ("headphones",), ()),
    "speaker": ("electronics", ("music lovers",), ("home audio", "parties"), ("audio cable", "speaker stand"),
                ("headphones", "soundbar"), ()),
    "tv": ("electronics", ("families", "movie fans"), ("home entertainment",),
           ("soundbar", "hdmi cable", "tv mount"), ("projector",), ()),
    "television": ("electronics", ("families", "movie fans"), ("home entertainment",),
                   ("soundbar", "hdmi cable", "tv mount"), ("projector",), ()),
    "camera": ("electronics", ("photographers", "travelers"), ("photography", "travel"),
               ("memory card", "camera bag", "tripod"), ("smartphone",), ()),
    "console": ("electronics", ("gamers",), ("gaming",), ("controller", "video games", "headset"), ("gaming pc",), ()),
    "smartwatch": ("electronics", ("fitness enthusiasts",), ("fitness tracking",), ("watch band", "charger"),
                   ("fitness tracker",), ()),
    # home and kitchen
    "blender": ("appliances", ("home cooks", "health-conscious eaters"), ("smoothie making", "meal prep"),
                ("blender cups",), ("food processor", "hand blender"), ()),
    "coffee maker": ("appliances", ("coffee drinkers",), ("brewing coffee", "morning routine"),
                     ("coffee beans", "coffee filters", "mug"), ("french press", "espresso machine"), ()),
    "vacuum": ("appliances", ("homeowners", "pet owners"), ("home cleaning",), ("vacuum bags", "replacement filters"),
               ("robot vacuum", "broom"), ()),
    "pan": ("home", ("home cooks",), ("everyday cooking",), ("spatula", "cooking oil", "pot holders"),
            ("skillet", "wok"), ()),
    "skillet": ("home", ("home cooks",), ("everyday cooking",), ("spatula", "cooking oil"), ("frying pan",), ()),
    "pot": ("home", ("home cooks",), ("everyday cooking",), ("ladle", "pot holders"), ("dutch oven",), ()),
    "cookware": ("home", ("home cooks",), ("everyday cooking",), ("utensil set", "pot holders"), (), ()),
    "knife": ("home", ("home cooks", "chefs"), ("food preparation",), ("cutting board", "knife sharpener"),
              ("kitchen shears",), ()),
    "mug": ("home", ("coffee drinkers",), ("everyday use",), ("coffee", "coasters"), ("travel mug",), ()),
    "lamp": ("home", ("homeowners", "students"), ("reading", "home decor"), ("light bulbs",), ("ceiling light",), ()),
    "candle": ("home", ("gift shoppers",), ("relaxation", "home decor"), ("candle holder", "lighter"),
               ("diffuser",), ("gifting",)),
    "garden": ("home", ("gardeners",), ("gardening",), ("garden gloves", "watering can"), (), ()),
    "plant": ("home", ("gardeners", "plant lovers"), ("gardening", "home decor"), ("plant pot", "potting soil"),
              ("artificial plant",), ()),
    # furniture
    "sofa": ("furniture", ("homeowners", "families"), ("living room furnishing",), ("throw pillows", "sofa cover"),
             ("sectional", "loveseat"), ()),
    "couch": ("furniture", ("homeowners", "families"), ("living room furnishing",), ("throw pillows",),
              ("sectional", "loveseat"), ()),
    "chair": ("furniture", ("office workers", "homeowners"), ("home office", "dining"), ("seat cushion", "desk"),
              ("stool",), ()),
    "desk": ("furniture", ("remote workers", "students"), ("home office", "studying"), ("desk chair", "desk lamp"),
             ("standing desk converter",), ()),
    "mattress": ("furniture", ("homeowners",), ("sleep",), ("bed sheets", "pillows", "mattress protector"),
                 ("mattress topper",), ()),
    # apparel and footwear
    "shirt": ("apparel", (), ("everyday wear",), ("jeans", "jacket"), ("polo shirt",), ()),
    "t-shirt": ("apparel", (), ("everyday wear",), ("jeans", "hoodie"), ("tank top",), ()),
    "dress": ("apparel", ("women",), ("parties", "everyday wear"), ("heels", "handbag"), ("skirt", "jumpsuit"), ()),
    "jacket": ("apparel", (), ("outdoor activities", "cold weather"), ("scarf", "gloves"), ("parka", "hoodie"),
               ("winter",)),
    "coat": ("apparel", (), ("cold weather",), ("scarf", "gloves"), ("parka",), ("winter",)),
    "jean": ("apparel", (), ("everyday wear",), ("t-shirt", "belt"), ("chinos",), ()),
    "sock": ("apparel", (), ("everyday wear",), ("shoes",), (), ()),
    "shoe": ("footwear", (), ("walking", "everyday wear"), ("socks", "shoe cleaner"), ("sneakers",), ()),
    "sneaker": ("footwear", (), ("walking", "everyday wear"), ("socks",), ("running shoes",), ()),
    "boot": ("footwear", (), ("cold weather", "hiking"), ("boot socks", "waterproofing spray"), ("shoes",), ("winter",)),
    "sandal": ("footwear", (), ("beach trips", "summer walks"), ("sunglasses",), ("flip flops",), ("summer",)),
    # sports and outdoors
    "running": ("sports", ("runners",), ("running", "marathon training"), ("running socks", "water bottle"), (), ()),
    "backpack": ("sports", ("students", "travelers", "hikers"), ("commuting", "travel", "hiking"),
                 ("water bottle", "laptop sleeve"), ("messenger bag", "duffel bag"), ()),
    "tent": ("sports", ("campers", "hikers"), ("camping",), ("sleeping bag", "camping stove", "headlamp"),
             ("hammock", "camping tarp"), ("summer",)),
    "sleeping bag": ("sports", ("campers",), ("camping",), ("tent", "sleeping pad"), ("camping blanket",), ()),
    "bike": ("sports", ("cyclists", "commuters"), ("commuting", "recreational riding"),
             ("bike helmet", "bike lock", "bike lights"), ("e-scooter",), ()),
    "bicycle": ("sports", ("cyclists", "commuters"), ("commuting", "recreational riding"),
                ("bike helmet", "bike lock", "bike lights"), ("e-scooter",), ()),
    "helmet": ("sports", ("cyclists",), ("cycling safety",), ("bike lights",), (), ()),
    "yoga": ("sports", ("yoga practitioners",), ("yoga practice", "home workouts"), ("yoga blocks", "yoga strap"),
             ("pilates mat",), ()),
    "dumbbell": ("sports", ("fitness enthusiasts",), ("strength training", "home workouts"),
                 ("weight bench", "workout gloves"), ("kettlebell", "resistance bands"), ()),
    # toys, books, music
    "toy": ("toys", ("kids", "parents"), ("play time",), ("batteries",), ("board game",), ("birthday", "christmas")),
    "puzzle": ("toys", ("puzzle enthusiasts", "families"), ("family time",), ("puzzle mat",), ("board game",), ()),
    "doll": ("toys", ("kids",), ("pretend play",), ("doll clothes",), ("action figure",), ("birthday", "christmas")),
    "lego": ("toys", ("kids", "adult builders"), ("building play",), ("storage bins",), ("building blocks",),
             ("birthday", "christmas")),
    "game": ("toys", ("families", "gamers"), ("game night",), ("snacks",), ("puzzle",), ()),
    "book": ("books", ("readers",), ("reading",), ("bookmark", "reading light"), ("e-book", "audiobook"), ()),
    "novel": ("books", ("fiction readers",), ("leisure reading",), ("bookmark",), ("audiobook",), ()),
    "guitar": ("music", ("musicians", "music students"), ("music practice", "performing"),
               ("guitar strings", "guitar picks", "tuner"), ("ukulele",), ()),
    # beauty, jewelry
    "shampoo": ("beauty", (), ("hair care",), ("conditioner",), ("dry shampoo",), ()),
    "conditioner": ("beauty", (), ("hair care",), ("shampoo",), ("leave-in conditioner",), ()),
    "lipstick": ("beauty", ("makeup users",), ("daily makeup",), ("lip liner", "makeup remover"), ("lip gloss",), ()),
    "mascara": ("beauty", ("makeup users",), ("daily makeup",), ("makeup remover",), ("false lashes",), ()),
    "moisturizer": ("beauty", ("skincare enthusiasts",), ("daily skincare",), ("cleanser", "sunscreen"),
                    ("face oil",), ()),
    "serum": ("beauty", ("skincare enthusiasts",), ("daily skincare",), ("moisturizer", "cleanser"), ("face oil",), ()),
    "perfume": ("beauty", ("gift shoppers",), ("daily wear", "evenings out"), ("body lotion",), ("body mist",),
                ("valentine's day", "anniversary")),
    "necklace": ("jewelry", ("gift shoppers",), ("special occasions", "everyday wear"), ("earrings", "jewelry box"),
                 ("pendant",), ("anniversary", "valentine's day")),
    "ring": ("jewelry", ("gift shoppers", "couples"), ("special occasions",), ("ring box",), (), ("anniversary",)),
    "earring": ("jewelry", ("gift shoppers",), ("special occasions", "everyday wear"), ("necklace", "jewelry box"),
                (), ("birthday",)),
    "bracelet": ("jewelry", ("gift shoppers",), ("everyday wear",), ("watch", "jewelry box"), (), ("birthday",)),
    "watch": ("jewelry", ("gift shoppers",), ("everyday wear",), ("watch band", "watch box"),
              ("smartwatch", "bracelet"), ("gifting",)),
    # grocery
    "coffee": ("grocery", ("coffee drinkers",), ("morning routine",), ("coffee grinder", "coffee filters", "mug"),
               ("tea",), ()),
    "tea": ("grocery", ("tea drinkers",), ("relaxing",), ("teapot", "tea infuser", "mug"), ("coffee",), ()),
    "wine": ("grocery", ("wine lovers",), ("dinner parties",), ("wine glasses", "corkscrew"), ("beer",), ()),
    "chocolate": ("grocery", ("gift shoppers", "sweet lovers"), ("snacking", "gifting"), ("wine",), ("candy",),
                  ("valentine's day", "christmas")),
    # baby, pets, auto
    "diaper": ("baby", ("parents of babies",), ("baby care",), ("baby wipes", "diaper cream"), ("cloth diapers",), ()),
    "stroller": ("baby", ("new parents",), ("walks with a baby",), ("stroller organizer", "car seat"),
                 ("baby carrier",), ()),
    "dog": ("pets", ("dog owners",), ("pet care",), ("dog leash", "dog treats"), (), ()),
    "cat": ("pets", ("cat owners",), ("pet care",), ("cat litter", "cat toys"), (), ()),
    "pet": ("pets", ("pet owners",), ("pet care",), ("pet bed",), (), ()),
    "tire": ("auto", ("car owners",), ("car maintenance",), ("tire pressure gauge",), (), ()),
}

# Title/description words that name an audience or an occasion regardless of category.
AUDIENCE_CUES: dict[str, str] = {
    "kid": "kids", "kids": "kids", "child": "kids", "children": "kids", "toddler": "toddlers",
    "baby": "parents of babies", "women": "women", "womens": "women", "woman": "women", "ladies": "women",
    "men": "men", "mens": "men", "man": "men", "pro": "professionals", "professional": "professionals",
    "beginner": "beginners", "gaming": "gamers", "gamer": "gamers", "student": "students",
    "senior": "seniors", "teen": "teens", "outdoor": "outdoor enthusiasts", "travel": "travelers",
}
OCCASION_CUES: dict[str, str] = {
    "christmas": "christmas", "xmas": "christmas", "birthday": "birthday", "wedding": "weddings",
    "halloween": "halloween", "valentine": "valentine's day", "valentines": "valentine's day",
    "graduation": "graduation", "anniversary": "anniversary", "gift": "gifting", "summer": "summer",
    "winter": "winter", "party": "parties", "easter": "easter", "thanksgiving": "thanksgiving",
}

MATERIALS = (
    "stainless steel", "cast iron", "carbon fiber", "cotton", "leather", "merino wool", "wool", "cashmere",
    "silk", "linen", "denim", "polyester", "nylon", "steel", "aluminum", "aluminium", "titanium", "wooden",
    "wood", "bamboo", "glass", "ceramic", "porcelain", "plastic", "silicone", "rubber", "marble", "gold",
    "silver", "copper", "brass", "canvas", "suede", "velvet", "oak", "walnut",
)
COLORS = (
    "black", "white", "red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "grey", "gray",
    "beige", "navy", "teal", "burgundy",
)
# Units in titles -> (attribute name, canonical unit)
UNITS: dict[str, tuple[str, str]] = {
    "ml": ("volume", "ml"), "l": ("volume", "l"), "fl oz": ("volume", "fl oz"), "fl. oz": ("volume", "fl oz"),
    "oz": ("size", "oz"), "g": ("weight", "g"), "kg": ("weight", "kg"), "lb": ("weight", "lb"),
    "lbs": ("weight", "lb"), "mm": ("dimension", "mm"), "cm": ("dimension", "cm"), "m": ("dimension", "m"),
    "in": ("dimension", "in"), "inch": ("dimension", "in"), "inches": ("dimension", "in"), "ft": ("dimension", "ft"),
    "gb": ("storage", "gb"), "tb": ("storage", "tb"), "mah": ("battery capacity", "mah"),
    "wh": ("battery capacity", "wh"), "w": ("power", "w"), "watt": ("power", "w"), "watts": ("power", "w"),
    "v": ("voltage", "v"), "volt": ("voltage", "v"), "volts": ("voltage", "v"),
}
# Title words that are never the product noun.
NOT_NOUNS = frozenset(
    {"new", "pack", "set", "pcs", "piece", "pieces", "count", "with", "for", "and", "the", "of", "in", "edition",
     "version", "model", "size", "large", "small", "medium", "mini", "pro", "max", "plus", "ultra", "premium"}
)
# fmt: on
