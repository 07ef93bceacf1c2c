"""A basic child-level vocabulary (~1,500 words) for TinyStories-style seeding and offline story writing.

Every word carries the grammar the story generator needs to use it correctly in any sentence:
  verbs       base / past / -ing forms, a usage kind (what sentences it fits), and a complement so that
              "to <verb> <complement>" reads naturally ("jump over the puddles", "share {his} toys").
              "[...]" in a complement marks an object the story may swap for its own thing ("drop [the cup]"),
              limited to the noun categories listed for that verb; "{his}" becomes the subject's possessive.
  nouns       plural (or mass / plural-only), a category that decides the noun's role in a story, a sub-type
              (animal habitat, place kind, person gender, vehicle size) and an extra field (a place's
              preposition, a furniture spot, an idea noun's verb collocation "sing:sang").
  adjectives  a category that decides what the word can describe (feelings -> characters, colours -> things).
  names       girls' and boys' first names.

The tables are written as compact text and parsed once at import; regular plurals and verb forms are
written out in full only where they are irregular (the parser spells the regular ones).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    base: str
    past: str
    ing: str
    kind: str                   # fun work kind bad oops react joy still mind state sense plain
    objects: frozenset[str]     # noun categories that may replace the [bracketed] object of the complement
    comp: str                   # complement template: "{his}" -> possessive, "{o}" -> object
    default_obj: str            # the object "{o}" stands for when the story has none that fits


@dataclass(frozen=True)
class Noun:
    word: str
    plural: str
    cat: str                    # animal person family toy food drink clothing thing furniture vehicle nature
                                # place sky weather body time event idea
    sub: str = ""               # animal habitat / place kind (out in town water) / gender (m f n) / vehicle size
    extra: str = ""             # place or furniture preposition / idea collocation "base:past"
    mass: bool = False          # "some sand", no plural
    plural_only: bool = False   # "the woods", "the stairs"


@dataclass(frozen=True)
class Adjective:
    word: str
    cat: str                    # feel+ feel- feel0 trait+ trait- size colour texture shape taste temp sound
                                # look state scene wild light weather speed


VERB_KINDS = ("fun", "work", "kind", "bad", "oops", "react", "joy", "still", "mind", "state", "sense", "plain")

# Object-category shorthands used in the verb table.
_GROUPS = {"port": ("toy", "thing", "clothing", "nature")}

# base past ing | kind | objects | complement   (past/ing may be omitted when regular: "jump | fun | ...")
_VERBS = """
jump | fun | - | over the puddles
hop hopped hopping | fun | - | like a bunny
skip skipped skipping | fun | - | down the path
run ran running | fun | - | in the tall grass
race | fun | - | to the big tree
dance | fun | - | to happy music
sing sang singing | fun | - | silly songs
swim swam swimming | fun | - | in the lake
splash | fun | - | in the puddles
dive dove diving | fun | - | into the pool
float | fun | - | on the water
climb | fun | - | tall trees
swing swung swinging | fun | - | on the swings
slide slid sliding | fun | - | down the big slide
spin spun spinning | fun | - | around and around
twirl | fun | - | around the room
roll | fun | - | down the hill
tumble | fun | - | in the soft grass
crawl | fun | - | through the long tunnel
march | fun | - | around the house
stomp | fun | - | in the mud
tiptoe tiptoed tiptoeing | fun | - | around the house
zoom | fun | - | around the yard
fly flew flying | fun | - | kites
ride rode riding | fun | vehicle | [{his} bike]
skate | fun | - | on the ice
sled sledded sledding | fun | - | down the snowy hill
paint | fun | port,furniture,vehicle | [pretty pictures]
draw drew drawing | fun | port,animal,vehicle,food | [funny pictures]
color | fun | - | in {his} coloring book
read read reading | fun | - | books about animals
write wrote writing | fun | - | little stories
build built building | fun | - | tall towers
dig dug digging | fun | - | in the sand
play | fun | - | outside
explore | fun | - | the woods
search | fun | - | for hidden treasure
discover | fun | - | new places
collect | fun | - | pretty shells
pick | fun | - | flowers
chase | fun | animal | [butterflies]
catch caught catching | fun | - | fireflies
throw threw throwing | fun | toy,nature | [the ball]
kick | fun | - | the ball
bounce | fun | - | on the bed
blow blew blowing | fun | - | bubbles
bake | fun | - | cookies
cook | fun | - | yummy food
fish | fun | - | in the pond
camp | fun | - | in the backyard
hike | fun | - | up the hill
sail | fun | - | little boats on the pond
paddle | fun | - | in the cool water
pretend | fun | - | to fly like a bird
imagine | fun | - | big adventures
stack | fun | - | wooden blocks
count | fun | - | the stars
spell | fun | - | new words
drum drummed drumming | fun | - | on the pots and pans
wave | fun | - | at the trains
hide hid hiding | fun | - | behind the big tree
wiggle | fun | - | {his} toes
jog jogged jogging | fun | - | in the park
gallop | fun | - | around the field
flap flapped flapping | fun | - | {his} arms like a bird
fold | fun | - | paper boats
cut cut cutting | fun | - | paper shapes
gather | fun | - | colorful leaves
sell sold selling | fun | - | lemonade
solve | fun | - | puzzles
ask | fun | - | lots of questions
answer | fun | - | questions in class
tell told telling | fun | - | funny stories
talk | fun | - | to the birds
chat chatted chatting | fun | - | with {his} friends
say said saying | fun | - | hello to everyone
whisper | fun | - | secrets
joke | fun | - | with the old farmer
speak spoke speaking | fun | - | to the animals
ring rang ringing | fun | - | the big bell
drive drove driving | fun | - | {his} toy cars
fetch | fun | - | sticks
find found finding | fun | port | [new things]
sew sewed sewing | fun | - | dresses for {his} dolls
knit knitted knitting | fun | - | warm scarves
meet met meeting | fun | - | new friends
dress | fun | - | up in funny clothes
juggle | fun | - | three balls
hunt | fun | - | for shells
travel traveled traveling | fun | - | to new places
tickle | fun | - | {his} little brother
scoop | fun | - | sand into the bucket
wander | fun | - | in the woods
leap | fun | - | over the log
tap tapped tapping | fun | - | on the drum
row | fun | - | a little boat
flip flipped flipping | fun | - | pancakes
toss | fun | toy,nature | [the ball]
nibble | fun | - | a carrot
munch | fun | - | crunchy apples
lick | fun | - | {his} ice cream
clean | work | port,furniture,vehicle | [the house]
wash | work | port,vehicle,animal | [the dishes]
sweep swept sweeping | work | - | the floor
mop mopped mopping | work | - | the kitchen floor
wipe | work | furniture | [the table]
dust | work | - | the shelves
tidy tidied tidying | work | - | {his} room
fix | work | toy,thing,vehicle,furniture | [broken toys]
carry | work | port,food | [the heavy bags]
lift | work | - | the heavy box
pack | work | - | the bags for the trip
water | work | - | the plants
plant | work | - | seeds in the garden
grow grew growing | work | - | big carrots
stir stirred stirring | work | - | the soup
mix | work | - | flour and eggs
pour | work | drink | [the milk]
set set setting | work | - | the table
hang hung hanging | work | - | the wet clothes
dry dried drying | work | - | the dishes
fill | work | - | the bucket with water
sort | work | - | the socks
shop shopped shopping | work | - | for food
rake | work | - | the leaves
shovel shoveled shoveling | work | - | the snow
brush | work | animal | [{his} teeth]
comb | work | - | {his} hair
tie tied tying | work | - | {his} shoes
wrap wrapped wrapping | work | port | [presents]
study studied studying | work | - | {his} letters
practice | work | - | the piano
work | work | - | in the garden
chop chopped chopping | work | - | wood for the fire
peel | work | - | the carrots
bathe | work | animal | [the dog]
glue | work | - | the pieces together
vacuum | work | - | the rug
scrub scrubbed scrubbing | work | - | the pots
rinse | work | - | the cups
sprinkle | work | - | sugar on the cookies
spread spread spreading | work | - | jam on the bread
help | kind | - | {his} friends
hug hugged hugging | kind | animal,toy | [{his} mom]
kiss | kind | - | {his} mom goodnight
share | kind | port,food,drink,vehicle | [{his} toys]
feed fed feeding | kind | animal | [the ducks]
pet petted petting | kind | animal | [the cat]
comfort | kind | - | {his} little brother
protect | kind | animal | [the little birds]
rescue | kind | animal | [lost animals]
save | kind | animal | [the little fish]
thank | kind | - | the bus driver
forgive forgave forgiving | kind | - | {his} friends
visit | kind | - | {his} grandma
invite | kind | - | friends over to play
welcome | kind | - | new kids at school
greet | kind | - | the neighbors
care | kind | - | for sick animals
teach taught teaching | kind | - | the puppy new tricks
lend lent lending | kind | - | {his} crayons to friends
give gave giving | kind | - | gifts to {his} friends
obey | kind | - | the rules
apologize | kind | - | to {his} friends
hold held holding | kind | animal | [the little kitten]
cuddle | kind | animal,toy | [{his} teddy bear]
guide | kind | - | the lost ducks home
lead led leading | kind | - | the little ones
call | kind | - | {his} grandma on the phone
cover | kind | - | the baby with a blanket
snuggle | kind | animal,toy | [{his} puppy]
praise | kind | - | {his} little sister
argue | bad | - | with {his} brother
fight fought fighting | bad | - | with {his} sister
yell | bad | - | at {his} friends
shout | bad | - | at {his} little sister
tease | bad | - | the other kids
grab grabbed grabbing | bad | port | [toys from other kids]
snatch | bad | port | [toys from {his} friends]
bite bit biting | bad | - | {his} nails
cheat | bad | - | at games
lie lied lying | bad | - | to {his} mom
steal stole stealing | bad | food | [cookies from the jar]
waste | bad | food,drink | [food]
whine | bad | - | about bedtime
complain | bad | - | about the rain
brag bragged bragging | bad | - | about {his} new toys
ignore | bad | - | {his} little brother
poke | bad | animal | [the sleeping cat]
slam slammed slamming | bad | - | the door
scribble | bad | - | on the walls
sneak snuck sneaking | bad | - | cookies before dinner
push | bad | - | the other kids
disobey | bad | - | {his} mom
fuss | bad | - | at dinner
trick | bad | - | {his} friends
blame | bad | - | the dog
grumble | bad | - | about {his} chores
scold | bad | - | {his} little brother
spit spat spitting | bad | - | on the ground
fall fell falling | oops | - | down
slip slipped slipping | oops | - | on the wet floor
trip tripped tripping | oops | - | over a rock
drop dropped dropping | oops | port,food | [{his} ice cream]
spill | oops | drink | [the milk]
break broke breaking | oops | toy,thing,furniture,vehicle | [the vase]
lose lost losing | oops | port | [{his} way]
tear tore tearing | oops | clothing | [{his} shirt]
crash | oops | - | into the fence
bump | oops | - | into the table
knock | oops | - | over the lamp
forget forgot forgetting | oops | port,food | [{his} lunch]
burn | oops | food | [the cookies]
pop popped popping | oops | - | the balloon
melt | oops | - | the chocolate
rip ripped ripping | oops | clothing | [{his} coat]
scratch | oops | - | {his} arm
smash | oops | - | the eggs
crack | oops | - | the window
sink sank sinking | oops | - | into the mud
miss | oops | - | the bus
hurt hurt hurting | oops | - | {his} knee
squash | oops | food | [the grapes]
stumble | oops | - | on the stairs
bang | oops | - | {his} head on the table
stain | oops | clothing | [{his} new shirt]
leave left leaving | oops | port | [{his} hat] at the park
splatter | oops | - | paint on the floor
smudge | oops | - | {his} drawing
wobble | oops | - | on {his} new skates
drip dripped dripping | oops | - | ice cream on {his} shirt
cry | react | - |
sob sobbed sobbing | react | - |
sneeze | react | - |
cough | react | - |
shiver | react | - | in the cold
tremble | react | - | with fear
yawn | react | - |
sniffle | react | - |
frown | react | - |
pout | react | - |
blush | react | - |
whimper | react | - |
hiccup hiccuped hiccuping | react | - |
shake shook shaking | react | - | with fear
scream | react | - | for help
sigh | react | - |
weep wept weeping | react | - |
gasp | react | - |
groan | react | - |
laugh | joy | - |
giggle | joy | - |
smile | joy | - |
grin grinned grinning | joy | - |
cheer | joy | - |
clap clapped clapping | joy | - | {his} hands
hum hummed humming | joy | - | a happy tune
whistle | joy | - | a little song
squeal | joy | - | with joy
chuckle | joy | - |
wink | joy | - | at {his} friend
celebrate | joy | - | with a party
sleep slept sleeping | still | - | in {his} own bed
nap napped napping | still | - | in the afternoon
rest | still | - |
wait | still | - | for {his} turn
sit sat sitting | still | - | still
stay | still | - | inside
stand stood standing | still | - | in line
wake woke waking | still | - | up early
behave | still | - | at the store
hurry | still | - |
relax | still | - | in the sun
know knew knowing | mind | - | the names of all the stars
learn | mind | - | new words
remember | mind | - | the way home
understand understood understanding | mind | - | how clocks work
think thought thinking | mind | - | about the stars
guess | mind | - | the answer
decide | mind | - | what to do
plan planned planning | mind | - | a big surprise
choose chose choosing | mind | port | [a new book]
explain | mind | - | the rules of the game
measure | mind | - | how tall {his} plant was
want | state | - | a pet of {his} own
need | state | - | a good friend
like | state | - | the sound of the rain
love | state | - | {his} family very much
hate | state | - | the dark
have had having | state | - | a little garden
own | state | - | a red wagon
wonder | state | - | where the wind came from
believe | state | - | in magic
dream | state | - | about flying
hope | state | - | for a sunny day
wish | state | - | for a puppy
agree agreed agreeing | state | - | to help {his} mom every day
belong | state | - | to a big, happy family
trust | state | - | {his} friends
enjoy | state | - | sunny days
see saw seeing | sense | - | the stars
look | sense | - | at the clouds
watch | sense | - | the birds
hear heard hearing | sense | - | the birds sing
listen | sense | - | to the rain
smell | sense | - | the flowers
taste | sense | food,drink | [new foods]
touch | sense | - | soft things
feel felt feeling | sense | - | the warm sand
notice | sense | - | little things
spot spotted spotting | sense | - | birds in the trees
peek | sense | - | out the window
stare | sense | - | at the fish
sniff | sense | - | the air
point | sense | - | at the planes
check | sense | - | the mailbox
go went going | plain | - | to the park
come came coming | plain | - | home early
bring brought bringing | plain | port,food | [{his} toys] outside
take took taking | plain | port | [a bath]
put put putting | plain | port | [the toys] away
open | plain | thing | [the big box]
close | plain | - | the door
pull | plain | vehicle | [the red wagon]
use | plain | thing | [a big spoon]
keep kept keeping | plain | port | [a secret]
get got getting | plain | port | [a new bike]
make made making | plain | toy,food | [a big sandcastle]
try tried trying | plain | food,drink | [new things]
buy bought buying | plain | port,food | [a new toy]
show | plain | port | [{his} drawings] to everyone
send sent sending | plain | - | a letter to {his} grandma
wear wore wearing | plain | clothing | [{his} red boots]
eat ate eating | plain | food | [{his} vegetables]
drink drank drinking | plain | drink | [{his} milk]
follow | plain | - | the little path
cross | plain | - | the busy street
move | plain | - | to a new house
return | plain | port | [the library books]
reach | plain | - | the top shelf
start | plain | - | a new game
finish | plain | food | [{his} dinner]
win won winning | plain | - | the race
change | plain | - | {his} clothes
pay paid paying | plain | - | for the ice cream
borrow | plain | port | [a book]
join | plain | - | the game
promise | plain | - | to be good
lock | plain | - | the door
drag dragged dragging | plain | port | [the heavy bag]
turn | plain | - | off the light
empty emptied emptying | plain | - | the bucket
pass | plain | - | the ball to {his} friend
squeeze | plain | - | the lemons
mail | plain | - | a letter
nod nodded nodding | plain | - | {his} head
chew | plain | - | {his} food
shut shut shutting | plain | - | the window
zip zipped zipping | plain | - | up {his} coat
button | plain | - | {his} coat
"""

# Nouns by category and sub-type. Entry syntax: word[/plural][@extra], "_" for a space in the word.
#   /-  mass noun ("some sand")      /+  plural-only ("the woods")      @extra  see Noun.extra
_NOUNS: list[tuple[str, str, str]] = [
    ("animal", "pet", "dog puppy/puppies cat kitten hamster goldfish/goldfish bunny/bunnies guinea_pig"),
    ("animal", "farm", """cow calf/calves pig piglet horse pony/ponies sheep/sheep lamb goat donkey chicken hen
        rooster chick duck duckling turkey bull llama mouse/mice rat ox/oxen"""),
    ("animal", "forest", """fox/foxes bear cub wolf/wolves deer/deer owl squirrel raccoon hedgehog skunk bat
        moose/moose chipmunk mole rabbit woodpecker porcupine badger snake hare"""),
    ("animal", "pond", "frog toad turtle swan goose/geese beaver otter tadpole fish/fish alligator"),
    ("animal", "sea", "whale dolphin shark octopus/octopuses crab lobster starfish/starfish jellyfish/jellyfish seahorse seagull pelican clam shrimp/shrimp"),
    ("animal", "jungle", """lion tiger elephant giraffe zebra monkey hippo rhino gorilla leopard cheetah kangaroo
        koala panda sloth parrot toucan flamingo ostrich/ostriches peacock crocodile lizard"""),
    ("animal", "garden", """ant bee butterfly/butterflies caterpillar ladybug spider worm snail beetle grasshopper
        dragonfly/dragonflies firefly/fireflies moth cricket slug"""),
    ("animal", "sky", "bird robin crow pigeon eagle sparrow bluebird hawk dove swallow"),
    ("animal", "cold", "penguin polar_bear seal walrus/walruses puffin reindeer/reindeer"),
    ("animal", "desert", "camel"),
    ("animal", "magic", "dragon unicorn dinosaur"),
    ("person", "m", "boy man/men king prince wizard mailman/mailmen fisherman/fishermen cowboy"),
    ("person", "f", "girl woman/women lady/ladies queen princess/princesses witch/witches fairy/fairies mermaid"),
    ("person", "n", """baby/babies kid child/children friend teacher doctor nurse farmer baker cook knight pirate
        giant clown police_officer firefighter bus_driver pilot sailor builder painter dancer singer artist
        neighbor stranger astronaut vet dentist zookeeper captain elf/elves monster shopkeeper librarian
        gardener coach mayor chef babysitter lifeguard scientist magician"""),
    ("family", "f", "mom mommy/mommies grandma granny/grannies sister aunt grandmother"),
    ("family", "m", "dad daddy/daddies grandpa brother uncle grandfather"),
    ("family", "n", "cousin"),
    ("toy", "", """ball doll teddy_bear kite block puzzle robot balloon yo-yo jump_rope marble drum whistle puppet
        rocking_horse dollhouse hula_hoop frisbee pinwheel beach_ball bubble_wand rattle trumpet flute guitar
        xylophone toy_soldier sticker crayon wand sword shield clay/- chalk/- sandcastle rubber_duck
        spinning_top toy train_set toy_car toy_boat toy_plane paper_plane music_box beanbag"""),
    ("food", "", """apple banana orange pear grape cherry/cherries strawberry/strawberries berry/berries lemon
        peach/peaches plum watermelon melon pineapple carrot pea bean potato/potatoes tomato/tomatoes corn/-
        pumpkin cucumber onion broccoli/- mushroom cake cookie cupcake pie bread/- sandwich/sandwiches pizza
        soup/- cheese/- egg butter/- honey/- jam/- candy/- chocolate/- ice_cream/- popcorn/- cereal/- rice/-
        pasta/- noodle muffin pancake waffle donut cracker pretzel lollipop snack sausage hot_dog nut peanut
        sugar/- flour/- yogurt/- pudding/- jelly/- toast/- bun biscuit coconut lime mango/mangoes
        blueberry/blueberries cabbage pepper salad lettuce/- meatball taco burger pickle olive raisin
        marshmallow candy_cane cotton_candy/- gingerbread_man/gingerbread_men bagel oatmeal/- kiwi apricot walnut ham/- jellybean sundae"""),
    ("drink", "", "milk/- juice/- water/- tea/- lemonade/- cocoa/- hot_chocolate/- milkshake smoothie"),
    ("clothing", "", """hat cap coat jacket scarf/scarves glove mitten sock shoe boot shirt dress/dresses skirt
        sweater vest belt tie bow ribbon crown cape mask costume apron helmet raincoat necklace bracelet ring
        slipper sandal uniform bib tutu sneaker hood swimsuit nightgown bathrobe headband sun_hat"""),
    ("thing", "", """box/boxes bag basket bucket cup mug bowl plate spoon fork knife/knives pot pan jar bottle key
        rope string book pencil pen paint/- brush/brushes comb mirror clock watch/watches phone camera candle
        flashlight map letter card note photo coin money/- treasure/- present gift blanket pillow towel soap/-
        sponge broom mop hammer nail shovel rake ladder wheel bell flag umbrella tent net magnet jewel gem
        crystal envelope stamp tape/- glue/- bandage medicine/- suitcase purse wallet button needle thread/-
        yarn/- leash/leashes collar cage teapot kettle lunchbox/lunchboxes toothbrush/toothbrushes
        hairbrush/hairbrushes trophy/trophies medal badge chain telescope radio paper/- notebook bead marker
        eraser vase backpack lantern ticket postcard shoebox toolbox watering_can lid jewelry_box fishing_rod sleeping_bag paintbox"""),
    ("furniture", "", """bed@under chair@under table@under sofa@behind couch/couches@behind desk@under
        shelf/shelves@on_top_of door@behind window@by wall@by floor@on roof@on stairs/+@under lamp@by rug@under
        carpet@under curtain@behind closet@in cupboard@in drawer@in fridge@on_top_of oven@by stove@by sink@in
        bathtub@in fireplace@by crib@in bench/benches@under fence@behind gate@by mailbox/mailboxes@in
        stool@under cushion@under mat@under bookcase@behind dresser@behind toy_box/toy_boxes@in
        doghouse@in armchair@behind bunk_bed@under cabinet@in"""),
    ("vehicle", "ride", "bike bicycle scooter sled wagon skateboard tricycle"),
    ("vehicle", "big", """car truck bus/buses train plane boat ship tractor rocket helicopter taxi van fire_truck
        ambulance police_car school_bus/school_buses submarine sailboat canoe raft motorcycle digger
        dump_truck jeep race_car spaceship"""),
    ("nature", "", """leaf/leaves rock stone pebble stick shell seashell feather flower rose daisy/daisies
        sunflower tulip seed acorn pinecone twig branch/branches petal snowflake snowball icicle bone nest
        clover dandelion weed vine root log plant grass/- sand/- mud/- dirt/- ice/- snowman/snowmen puddle moss/- hay/- wave"""),
    ("place", "out", """park@at forest@in woods/+@in field@in meadow@in hill@on mountain@on valley@in garden@in
        yard@in backyard@in playground@at farm@on orchard@in jungle@in desert@in cave@in tree@under
        treehouse@in sandbox/sandboxes@in camp@at zoo@at circus/circuses@at fair@at swamp@in path@on
        trail@on castle@at tower@at bush/bushes@by pumpkin_patch@in"""),
    ("place", "water", "beach/beaches@at lake@by pond@by river@by sea@by ocean@by pool@at stream@by waterfall@by harbor@at island@on lighthouse@at dock@on"),
    ("place", "town", """street@on road@on bridge@on town@in city/cities@in village@in market@at store@at shop@at
        bakery/bakeries@at toy_store@at library/libraries@at museum@at hospital@at school@at station@at
        airport@at bus_stop@at post_office@at restaurant@at palace@at fire_station@at candy_store@at
        pet_shop@at ice_cream_shop@at aquarium@at bookstore@at gym@at"""),
    ("place", "in", """house@in kitchen@in bedroom@in bathroom@in living_room@in attic@in basement@in barn@in
        garage@in shed@in classroom@in hallway@in playroom@in porch/porches@on cottage@in cabin@in hut@in
        igloo@in"""),
    ("sky", "", "sun moon star rainbow cloud sky/skies sunset sunrise comet planet"),
    ("weather", "", "rain/- snow/- wind/- storm thunder/- lightning/- fog/- sunshine/- breeze hail/- snowstorm"),
    ("body", "", """hand foot/feet knee arm leg head nose ear eye mouth tooth/teeth toe finger thumb elbow chin
        neck tummy/tummies belly/bellies cheek lip tongue shoulder wing tail paw face hair/- back"""),
    ("time", "", "morning afternoon evening night day week weekend summer winter spring autumn bedtime year month minute hour"),
    ("event", "", """party/parties picnic race show parade trip contest festival wedding concert sleepover vacation
        birthday holiday dance puppet_show carnival play"""),
    ("idea", "", """idea@have:had song@sing:sang story/stories@tell:told game@play:played picture@draw:drew
        drawing@make:made secret@keep:kept surprise@plan:planned wish/wishes@make:made dream@have:had
        joke@tell:told plan@make:made word@learn:learned noise@hear:heard sound@hear:heard
        music/-@play:played question@ask:asked lesson@learn:learned hug@give:gave smile@give:gave
        trick@learn:learned riddle@tell:told poem@write:wrote adventure@have:had nap@take:took
        bath@take:took walk@take:took look@take:took fun/-@have:had magic/-@do:did"""),
]

# Adjectives by category. feel*: a character's passing state (+ good, - bad, 0 neutral); trait*: who a
# character is; the rest describe things, places or the day.
_ADJECTIVES: dict[str, str] = {
    "feel+": "happy glad excited proud calm cheerful jolly joyful thankful grateful delighted pleased hopeful "
             "cozy safe relieved merry eager comfy thrilled giggly",
    "feel-": "sad angry mad scared afraid lonely bored grumpy upset worried nervous sorry embarrassed jealous "
             "cranky frightened sick hurt unhappy gloomy sore shocked sulky teary homesick",
    "feel0": "surprised curious confused puzzled amazed sleepy hungry thirsty tired ready alone awake full sweaty dizzy",
    "trait+": "kind nice good brave smart clever silly funny gentle friendly polite helpful honest caring "
              "generous patient careful wise playful cute lovely loving loyal shy neat tidy bold "
              "thoughtful chatty lively hardworking fearless young tough daring graceful",
    "trait-": "bad naughty rude mean bossy greedy selfish stubborn lazy careless foolish sneaky nosy clumsy "
              "grouchy impatient cheeky fussy whiny spoiled",
    "size": "big small little tiny huge giant large tall short long wide thin fat chubby plump deep enormous "
            "skinny narrow teeny mini",
    "colour": "red blue green yellow orange purple pink brown black white gray golden silver colorful spotted "
              "striped gold pale rosy violet tan",
    "texture": "soft hard smooth rough bumpy fluffy fuzzy furry silky sticky slimy slippery wet dry muddy dusty "
               "squishy prickly spiky lumpy crinkly bouncy stretchy scratchy shaggy puffy sandy wrinkly feathery woolly",
    "shape": "round square flat curly straight pointy crooked bent wavy sharp oval twisty",
    "taste": "yummy tasty sweet sour salty bitter spicy juicy delicious crunchy crispy creamy chewy fresh ripe "
             "rotten stale gooey sugary fizzy minty fruity cheesy buttery",
    "temp": "hot cold warm cool icy chilly freezing toasty frosty",
    "sound": "loud quiet noisy squeaky",
    "look": "pretty beautiful ugly shiny sparkly glittery fancy plain strange weird odd special magic magical "
            "wonderful amazing great perfect scary spooky stinky smelly yucky boring exciting interesting "
            "old new twinkly dull",
    "state": "clean dirty messy broken torn empty heavy light wooden plastic hidden real fake frozen stuck "
             "loose tight tangled useful cracked soggy spotless",
    "scene": "crowded peaceful dangerous silent busy",
    "wild": "wild tame lost healthy",
    "light": "bright dark dim glowing",
    "weather": "sunny rainy windy cloudy snowy foggy stormy misty breezy",
    "speed": "fast slow quick strong weak speedy",
}

_GIRLS = """Lily Mia Sue Amy Anna Lucy Emma Ella Sara Zoe Kate Jane Rose Ruby Daisy Molly Sophie Lola Ivy Maya
    Nina Tina Kim Ava Grace Hannah Chloe Jenny Lisa Susie Polly Rosie Hazel Luna Stella Bella Olive Clara Alice
    Leah Ellie Millie Katie Megan Jill Beth Meg Nora Penny Poppy Holly Ruth June Pam Tess Abby Emily Jess Sally
    Wendy Cindy Lucy Mary Eva Lena Mila Julia Fiona Greta Heidi Iris Joy Kira Lara"""
_BOYS = """Tom Tim Ben Sam Max Jack Leo Joe Bob Jim Dan Mike Nick Luke Jake Finn Noah Liam Ollie Eli Jay Ted Ned
    Pete Rex Bill Billy Timmy Tommy Bobby Danny Johnny Jimmy Kevin Mark Paul Ryan Adam Owen Henry Oscar Hugo
    Felix Milo Theo Toby Charlie Harry Freddie George Jacob Ethan Lucas Ian Ray Roy Zack Gus Ed Fred Alex Simon
    Peter Andy Carl David Frank Hank Jonah Kai Louis"""

# Names for pets and animal heroes, either gender.
PET_NAMES = tuple("""Spot Fluffy Buddy Coco Whiskers Patch Pip Bingo Rusty Snowy Sunny Biscuit Peanut Pepper Muffin
    Bubbles Goldie Fuzzy Rocky Lucky Shadow Ziggy Sparky Button Honey Cookie Marshmallow Squeaky Flash Dotty""".split())


# --- parsing -------------------------------------------------------------------------------------------------

def _plural(w: str) -> str:
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return w + "es"
    if w.endswith("y") and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def _past(w: str) -> str:
    if w.endswith("e"):
        return w + "d"
    if w.endswith("y") and w[-2] not in "aeiou":
        return w[:-1] + "ied"
    return w + "ed"


def _ing(w: str) -> str:
    if w.endswith("ie"):
        return w[:-2] + "ying"
    if w.endswith("e") and not w.endswith(("ee", "ye", "oe")):
        return w[:-1] + "ing"
    return w + "ing"


def _parse_verbs() -> tuple[Verb, ...]:
    out = []
    for line in _VERBS.strip().splitlines():
        forms, kind, objs, comp = (p.strip() for p in line.split("|"))
        f = forms.split()
        base, past, ing = (f[0], _past(f[0]), _ing(f[0])) if len(f) == 1 else f
        cats: set[str] = set()
        for o in objs.split(","):
            if o != "-":
                cats.update(_GROUPS.get(o, (o,)))
        default = ""
        if "[" in comp:  # "[the ball] away" -> comp "{o} away", default object "the ball"
            i, j = comp.index("["), comp.index("]")
            default, comp = comp[i + 1:j], comp[:i] + "{o}" + comp[j + 1:]
        assert kind in VERB_KINDS, line
        out.append(Verb(base, past, ing, kind, frozenset(cats), comp, default))
    return tuple(out)


def _parse_nouns() -> tuple[Noun, ...]:
    out = []
    for cat, sub, text in _NOUNS:
        for entry in text.split():
            entry, _, extra = entry.partition("@")
            word, _, pl = entry.partition("/")
            word = word.replace("_", " ")
            mass, only = pl == "-", pl == "+"
            plural = word if (mass or only) else (pl.replace("_", " ") if pl else _plural(word))
            out.append(Noun(word, plural, cat, sub, extra.replace("_", " "), mass, only))
    return tuple(out)


def _parse_adjectives() -> tuple[Adjective, ...]:
    return tuple(Adjective(w, cat) for cat, text in _ADJECTIVES.items() for w in text.split())


def _dedupe(words: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(words))


VERBS: tuple[Verb, ...] = _parse_verbs()
NOUNS: tuple[Noun, ...] = _parse_nouns()
ADJECTIVES: tuple[Adjective, ...] = _parse_adjectives()
GIRL_NAMES: tuple[str, ...] = _dedupe(_GIRLS.split())
BOY_NAMES: tuple[str, ...] = _dedupe(_BOYS.split())

VERB = {v.base: v for v in VERBS}
NOUN = {n.word: n for n in NOUNS}
ADJECTIVE = {a.word: a for a in ADJECTIVES}
assert len(VERB) == len(VERBS) and len(NOUN) == len(NOUNS) and len(ADJECTIVE) == len(ADJECTIVES), "duplicate word"


def by_cat(cat: str, sub: str | None = None) -> tuple[Noun, ...]:
    """All nouns of one category (and sub-type)."""
    return tuple(n for n in NOUNS if n.cat == cat and (sub is None or n.sub == sub))
