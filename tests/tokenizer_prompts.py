"""Prompts on which our tokenizer must give exactly transformers' ids: one list per kind of trouble."""

PLAIN = [
    "a photo of a cat",
    "Hello, world!",
    "dreambeach",
    "dream beach",
    "a photograph of an astronaut riding a horse",
    "a beautiful landscape painting of a mountain lake at sunset, trending on artstation",
    "portrait of a woman, oil on canvas, by rembrandt",
    "a cyberpunk city street at night, neon lights, rain, cinematic lighting, 8k",
    "a corgi wearing a top hat, studio ghibli style",
    "an isometric render of a tiny cozy cabin in the woods",
    "macro shot of a dew drop on a leaf",
    "ultra detailed, intricate, sharp focus, octane render, unreal engine 5",
    "steampunk airship above victorian london",
    "watercolor illustration of a fox in the snow",
    "a bowl of ramen, food photography, bokeh",
    "antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious",
    "xqzvbnmlkjh",
    "a",
    "I",
    "cat dog cat dog cat dog",
    "the the the the",
]

CASE = [
    "A PHOTO OF A CAT",
    "A Photo Of A Cat",
    "aPhOtOoFaCaT",
    "DreamBeach",
    "DREAM BEACH",
    "McDonald's iPhone eBay",
    "NASA's JWST image of the Pillars of Creation",
    "ΑΘΗΝΑ athena Ἀθηνᾶ",
    "İstanbul ıstanbul ISTANBUL",
    "STRASSE straße Straße",
    "ǅemal Ǆ ǆ",
]

CONTRACTIONS = [
    "don't stop believin'",
    "it's a dog's life",
    "I'm sure you'll see they've gone, we'd know",
    "you're here and we're there",
    "IT'S SHOUTING, DON'T YOU THINK?",
    "rock 'n' roll",
    "'s 't 're 've 'm 'll 'd",
    "o'clock o'neill y'all",
    "it’s a curly apostrophe",
    "‘single’ and “double” curly quotes",
    "it''s doubled",
    "'quoted'",
]

NUMBERS = [
    "1234567890",
    "3.14159 is pi",
    "1,000,000 dollars",
    "year 2023, 4k, 8k, 16k",
    "-42 +17 1e10 0x1F",
    "v1.5 vs v2.1",
    "24mm f/1.8 1/250s iso 100",
    "١٢٣ arabic-indic digits ٤٥٦",
    "१२३ devanagari digits",
    "½ ⅓ ¼ ² ³ ① ⑩",
    "Ⅻ roman numeral twelve",
    "１２３ full-width digits",
]

PUNCTUATION = [
    "...",
    "!!!???",
    "hello...world!!!",
    "(masterpiece:1.2), ((best quality)), [blurry]",
    "{a|b|c}",
    "a, b; c: d - e – f — g",
    "#hashtag @mention $money %percent ^caret &amp *star",
    "~~~ ``` ''' \"\"\"",
    "<lora:foo:0.8>",
    "\\backslash\\ /slash/",
    "a--b__c==d",
    "¿qué? ¡sí!",
    "«guillemets» „low quotes“",
    "※ † ‡ § ¶ •",
    "->>= <=> !==",
    ":-) ;-( :D <3",
]

HTML = [
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "rock &#39;n&#39; roll",
    "&quot;quoted&quot;",
    "caf&eacute; na&iuml;ve",
    "&#8364;100 and &#x20AC;200",
    "&nbsp;non&nbsp;breaking",
    "&amp;amp; double escaped",
    "&copy; 2023 &reg; &trade;",
    "&AMP; upper case entity",
    "&notanentity; &",
    "<b>real tags</b> &amp; an entity",
    "a &amp; b <|endoftext|> c &amp; d",
]

MOJIBAKE = [
    "cafÃ©",
    "naÃ¯ve faÃ§ade",
    "Ã¼ber",
    "â€œsmart quotesâ€\x9d",
    "itâ€™s broken",
    "Ãœbung",
    "ðŸ˜€ mojibake emoji",
    "SÃ£o Paulo",
    "Ã¡Ã©Ã\xadÃ³Ãº",
    "Â£100",
]

ACCENTS = [
    "café",
    "naïve façade",
    "über straße",
    "crème brûlée",
    "São Paulo, Zürich, Kraków, Reykjavík",
    "cafe\u0301 (combining acute)",
    "Ångström",
    "piñata jalapeño",
    "Ærøskøbing",
    "œuvre Œuvre",
    "Đà Nẵng phở",
    "ﬁne ﬂower ﬀ ligatures",
]

CJK_AND_SCRIPTS = [
    "一只猫的照片",
    "梦想海滩",
    "東京タワーの夜景",
    "ひらがな カタカナ 漢字",
    "한국어 프롬프트 테스트",
    "中文English混合text",
    "Привет, мир!",
    "Москва зимой",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "ქართული ენა",
    "Ελληνικά γράμματα",
    "𠀀 𪚥 rare cjk extension b",
    "ｈｅｌｌｏ　ｗｏｒｌｄ",
    "ＡＢＣ　ｆｕｌｌ－ｗｉｄｔｈ！",
    "ｶﾀｶﾅ half-width katakana",
    "【東京】「京都」『大阪』",
    "、。・ー〜",
]

EMOJI = [
    "🏖",
    "a cat 🐱 on a beach 🏖️",
    "👍🏽 thumbs up with skin tone",
    "👨‍👩‍👧‍👦 family zwj sequence",
    "🇯🇵🇺🇸 flags",
    "❤️ ♥ ❤",
    "🔥🔥🔥 fire",
    "emoji🙂glued🙃together",
    "☀️⛅🌧️❄️",
    "1️⃣ keycap",
    "🧑‍🚀 astronaut",
    "😀😃😄😁😆😅😂🤣",
]

WHITESPACE = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    "a  photo   of    a cat",
    "  leading and trailing  ",
    "tabs\there\tand\tthere",
    "new\nlines\r\nand\rcarriage returns",
    "mixed \t\n \r whitespace",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    "em\u2003space thin\u2009space",
    "line\u2028separator\u2029paragraph",
    "form\x0cfeed vertical\x0btab",
    "\x1cfile\x1dgroup\x1erecord\x1funit separators",
    "soft\u00adhyphen",
    "control\x00null\x07bell\x1bescape",
    "bom\ufeffinside",
    "replacement \ufffd char",
]

URLS = [
    "https://example.com/path?query=1&b=2#frag",
    "http://www.test.org/~user/index.html",
    "email me at someone@example.com",
    "ftp://files.example.net/a_b-c.d",
    "see www.huggingface.co/runwayml/stable-diffusion-v1-5",
    "C:\\Users\\name\\Pictures\\cat.png",
    "/home/user/image_001.jpg",
]

SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|startoftext|>a cat<|endoftext|>",
    "a cat <|endoftext|> a dog",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|>",
    "<|StartOfText|> mixed case",
    "<|endoftext",
    "endoftext|>",
    "<| endoftext |>",
    "&lt;|endoftext|&gt;",
    "x<|endoftext|>y",
    "  <|startoftext|>  spaced  <|endoftext|>  ",
    "<|startoftext|>&amp;",
]

LONG = [
    " ".join(["a very long prompt"] * 30),
    "masterpiece, best quality, " * 20,
    ", ".join(f"tag{i}" for i in range(60)),
    "1 2 3 4 5 6 7 8 9 0 " * 10,
    "🐱" * 80,
    "一只猫" * 40,
    "supercalifragilisticexpialidocious " * 12,
    "a photo of a cat " * 15 + "and the dropped tail",
    ("word " * 74).strip(),
    ("word " * 75).strip(),
    ("word " * 76).strip(),
    ("word " * 77).strip(),
    "!" * 300,
    "a," * 76,
    "hello\tworld\n" * 40,
    "&amp; " * 80,
]

# The same few prompts, each through the transformations that most often change a tokenizer's output.
_BASES = ["a photo of a cat", "dream beach at dawn", "don't panic, it's 42", "Café Zürich"]
_TRANSFORMS = [
    str.upper,
    str.title,
    lambda s: s.replace(" ", "\t"),
    lambda s: s.replace(" ", "\n "),
    lambda s: "  " + s + "  ",
    lambda s: s.replace(" ", ""),
    lambda s: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s),  # full-width forms
    lambda s: s.replace("'", "&#39;").replace(" ", " &amp; "),
    lambda s: s.encode("utf-8").decode("latin-1"),  # mojibake
    lambda s: s + " 🎨",
    lambda s: s + "!!!",
    lambda s: "(" + s + ":1.3)",
]
TRANSFORMED = [transform(base) for base in _BASES for transform in _TRANSFORMS]

PROMPTS = (
    PLAIN + CASE + CONTRACTIONS + NUMBERS + PUNCTUATION + HTML + MOJIBAKE + ACCENTS
    + CJK_AND_SCRIPTS + EMOJI + WHITESPACE + URLS + SPECIAL_TOKENS + LONG + TRANSFORMED
)
