"""The Shapes user that reads pixels: `scene_reader:<file>` gives a user whose feedback is what the scene reader sees
differ between the shown image and the target, and whose answer to a cell question names what is in that cell."""
from __future__ import annotations

from core.shapes.render import render
from core.shapes.world import Obj, Scene
from mir.refiner import ShapesRefiner
from mir.user import load_user

BG = (240, 240, 240)
TARGET = Scene((Obj("triangle", "orange", "large", 0, 1), Obj("cross", "cyan", "large", 2, 0)), BG)
SHOWN = Scene((Obj("triangle", "blue", "large", 0, 1), Obj("circle", "red", "large", 1, 1)), BG)


def test_pixel_user_says_what_differs_and_answers_cells(scene_reader_file):
    user = load_user(f"scene_reader:{scene_reader_file}")
    shown, target = render(SHOWN, 64), render(TARGET, 64)
    feedback = user.compare([shown], [target])[0]
    assert feedback == ("remove the red circle in the middle and make the blue triangle in the top middle orange "
                        "and add a cyan cross in the bottom left")
    # the refiner's query after this feedback holds exactly the target's objects (sizes aside: the reader does
    # not read them)
    refiner = ShapesRefiner()
    state, missed = refiner.refine(refiner.start("a large blue triangle in the top middle and a large red circle in "
                                                 "the middle"), feedback)
    assert missed == 0
    assert sorted((o.shape, o.colour, o.cell) for o in state.objects) == [("cross", "cyan", (2, 0)),
                                                                          ("triangle", "orange", (0, 1))]
    assert user.answer([(2, 0), (1, 1)], [target, target]) == ["add a cyan cross in the bottom left",
                                                                 "nothing in the middle"]
    assert user.compare([target], [target]) == [""]
