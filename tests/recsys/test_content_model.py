"""The content model's files: what `save` writes, `load` reads back exactly."""

import numpy as np
import polars as pl

from recsys import content


def test_a_saved_content_model_loads_back_the_same_arrays_and_vectors(tmp_path):
    items = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["Red wool jacket", "Blue wool jacket", "Garden hose", "???"],
            "category": ["jackets", "jackets", "garden", None],
            "brand": ["north", "north", "green", None],
            "tags": [["sale"], [], ["outdoor"], None],
        }
    )
    model = content.fit(items, dim=3, seed=0)
    model.save(str(tmp_path))
    stored = pl.read_parquet(tmp_path / content.ITEMS_FILE)
    assert stored.schema == pl.Schema({"item_id": pl.String, "vector": pl.List(pl.Float32)})
    loaded = content.ContentModel.load(str(tmp_path))
    assert loaded.item_ids == ["a", "b", "c", "d"]
    assert loaded.item_vectors.dtype == np.float32
    np.testing.assert_array_equal(loaded.item_vectors, model.item_vectors)
    np.testing.assert_array_equal(loaded.components, model.components)
    np.testing.assert_array_equal(loaded.idf, model.idf)
    assert (loaded.word_vocab, loaded.char_vocab) == (model.word_vocab, model.char_vocab)
    # the two jackets are each other's nearest item, read from the loaded vectors
    rows, _ = content.neighbours(loaded, loaded.item_vectors[0], 1, exclude=0)
    assert rows.tolist() == [1]
