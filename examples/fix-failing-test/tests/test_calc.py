from calc import average


def test_average_of_three_numbers():
    assert average([1, 2, 3]) == 2


def test_average_of_one_number():
    assert average([5]) == 5
